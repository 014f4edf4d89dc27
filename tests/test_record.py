"""Recording correctness on tiny CPU models: what the hooks capture is what the model executes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tracekit.errors import UserError  # noqa: E402
from tracekit.record.generate import left_pad  # noqa: E402
from tracekit.record.models import Loaded, build_random, load_model, resolve, tiny_config  # noqa: E402
from tracekit.record.recorder import record  # noqa: E402
from tracekit.record.tokenizer import byte_tokenizer  # noqa: E402
from tracekit.trace import read_trace  # noqa: E402

PROMPTS = ["Hello there, world", "def f(x):", "世界你好", "2+2="]   # different lengths -> left padding
N_NEW = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-mixtral")


def _tiny(arch: str, **cfg) -> Loaded:
    config = tiny_config(arch, num_layers=3)
    for k, v in cfg.items():
        setattr(config, k, v)
    model = build_random(config, "cpu", torch.float32, seed=5).eval()
    return Loaded(model, byte_tokenizer(), {"model": f"tiny-{arch}"})


def _spy(model):
    """Forward pre-hooks on every layers[i].mlp.experts: the top-k ids the experts really execute."""
    calls = []
    handles = [layer.mlp.experts.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, a[1].clone())))
               for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    return calls, handles


def _check_against_spy(loaded, trace, calls, prompts, batch_size):
    tok = loaded.tokenizer
    moe_ids = trace.meta["moe_layer_ids"]
    L = len(moe_ids)
    assert len(calls) == trace.num_steps * L
    for s in range(trace.num_steps):
        sel = trace.step == s
        executed = [calls[s * L + l] for l in range(L)]
        assert [i for i, _ in executed] == moe_ids
        if trace.phase[sel][0] == 0:  # prefill: non-pad rows b*S + t of the padded batch
            b0 = int(trace.seq_id[sel].min())
            lists = [tok(p)["input_ids"] for p in prompts[b0:b0 + batch_size]]
            _, mask = left_pad(lists, 0)
            keep = np.flatnonzero(mask.reshape(-1))
        else:  # decode: one row per live sequence, index = position in the batch
            keep = trace.seq_id[sel] - (trace.seq_id[sel].min() // batch_size) * batch_size
        for l, (_, idx) in enumerate(executed):
            np.testing.assert_array_equal(trace.experts[sel][:, l, :], idx.numpy()[keep])


def test_captured_experts_equal_executed_experts(tiny, tmp_path):
    calls, handles = _spy(tiny.model)
    try:
        record(out=tmp_path / "t.parquet", loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, batch_size=3,
               eos_token_id=[])
    finally:
        for h in handles:
            h.remove()
    t = read_trace(tmp_path / "t.parquet")
    assert t.complete and t.num_steps == 2 * N_NEW  # two batches, 1 prefill + N_NEW-1 decodes each
    assert np.all(np.diff(t.step) >= 0)
    _check_against_spy(tiny, t, calls, PROMPTS, 3)


def _assert_topk_from_logits(t, renormalize: bool):
    order = np.argsort(-t.logits, axis=-1, kind="stable")[..., : t.top_k]
    np.testing.assert_array_equal(order, t.experts)
    p = torch.softmax(torch.from_numpy(t.logits.copy()), -1).numpy()
    w = np.take_along_axis(p, t.experts.astype(np.int64), -1)
    if renormalize:
        w = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, t.weights, rtol=1e-5, atol=1e-6)


def test_topk_recomputed_from_logits_equals_stored(tiny, tmp_path):
    record(out=tmp_path / "t.parquet", loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, hidden="full")
    t = read_trace(tmp_path / "t.parquet")
    _assert_topk_from_logits(t, renormalize=True)
    # replay contract: stored router weights applied to the stored (full) hidden state give the logits
    re = np.einsum("tld,led->tle", t.hidden.astype(np.float32), t.router)
    np.testing.assert_allclose(re, t.logits, atol=2e-2)
    assert t.router.shape == (4, 8, 64) and t.meta["bytes_per_expert"] == 3 * 64 * 96 * 4


def test_hidden_projection_is_reproducible_from_the_seed(tiny, tmp_path):
    from tracekit.record.hooks import projection_matrix

    record(out=tmp_path / "f.parquet", loaded=tiny, prompts=PROMPTS[:2], max_new_tokens=3, hidden="full")
    record(out=tmp_path / "p.parquet", loaded=tiny, prompts=PROMPTS[:2], max_new_tokens=3, hidden="proj:8")
    f, p = read_trace(tmp_path / "f.parquet"), read_trace(tmp_path / "p.parquet")
    assert p.hidden_kind == "proj:8" and p.hidden.shape == (p.num_tokens, 4, 8)
    P = projection_matrix(64, 8, p.hidden_proj_seed).numpy()
    np.testing.assert_allclose(f.hidden.astype(np.float32) @ P, p.hidden.astype(np.float32), atol=2e-2, rtol=1e-2)


def test_gpu_bench_script_logic_on_cpu(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_record_overhead.py")
    spec = importlib.util.spec_from_file_location("gpu_record_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.md"
    assert mod.main(["--tiny", "--out", str(out), "--repeats", "1", "--new-tokens", "3", "--prompts", "2"]) == 0
    text = out.read_text()
    assert "| no hooks |" in text and "| --hidden none |" in text and "| --hidden full |" in text
    assert "device: CPU" in text and "4 layers" in text


def test_tokens_identical_with_and_without_hooks_and_match_hf_generate(tiny, tmp_path):
    a = record(out=tmp_path / "a.parquet", loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, hidden="proj:8")
    b = record(loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, hooks=False)
    assert a["generated"] == b["generated"] and len(a["generated"]) == len(PROMPTS)
    tok = tiny.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    with torch.no_grad():
        hf = tiny.model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=N_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    for b_, gen in enumerate(a["generated"]):
        assert hf[b_, ids.shape[1]:ids.shape[1] + len(gen)].tolist() == gen


def test_padding_and_eos_rows_are_masked(tiny, tmp_path):
    base = record(loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, hooks=False)["generated"]
    eos = base[0][2]                       # make sequence 0 stop after its third token
    j0 = base[0].index(eos)
    s = record(out=tmp_path / "e.parquet", loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW,
               batch_size=4, eos_token_id=eos)
    t = read_trace(tmp_path / "e.parquet")
    assert len(s["generated"][0]) == j0 + 1 and s["generated"][0][-1] == eos
    tok = tiny.tokenizer
    for q, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]
        gen = s["generated"][q]
        pre = (t.seq_id == q) & (t.phase == 0)
        dec = (t.seq_id == q) & (t.phase == 1)
        # prefill: exactly the prompt tokens, no padding rows
        assert t.token_id[pre].tolist() == ids and t.position[pre].tolist() == list(range(len(ids)))
        # decode: only tokens fed before EOS (or before the last step)
        n_fed = min(gen.index(eos) if eos in gen else len(gen), N_NEW - 1)
        assert t.token_id[dec].tolist() == gen[:n_fed]
        assert t.position[dec].tolist() == list(range(len(ids), len(ids) + n_fed))
    assert (t.token_id != tok.pad_token_id).all()
    steps_of_seq0 = np.unique(t.step[t.seq_id == 0])
    assert steps_of_seq0.size == 1 + j0 < t.num_steps   # seq 0 leaves the batch after its EOS


def test_save_pretrained_then_load_from_path_records_same_trace(tiny, tmp_path):
    path = tmp_path / "ckpt"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    record(out=tmp_path / "a.parquet", loaded=tiny, prompts=PROMPTS, max_new_tokens=4)
    s = record(model=str(path), out=tmp_path / "b.parquet", prompts=PROMPTS, max_new_tokens=4)
    a, b = read_trace(tmp_path / "a.parquet"), read_trace(tmp_path / "b.parquet")
    assert b.meta["weights"] == "pretrained" and b.meta["tokenizer"] == "pretrained" and s["steps"] == a.num_steps
    np.testing.assert_array_equal(a.token_id, b.token_id)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)


def test_killed_by_exception_leaves_readable_incomplete_trace(tiny, tmp_path, monkeypatch):
    from tracekit.record import hooks

    full = tmp_path / "full.parquet"
    record(out=full, loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, eos_token_id=[])
    orig, n = hooks.RoutingHooks.end_step, [0]

    def boom(self, *a, **k):
        n[0] += 1
        if n[0] == 5:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(hooks.RoutingHooks, "end_step", boom)
    out = tmp_path / "k.parquet"
    with pytest.raises(KeyboardInterrupt):
        record(out=out, loaded=tiny, prompts=PROMPTS, max_new_tokens=N_NEW, flush_steps=2, eos_token_id=[])
    assert not out.exists() and (tmp_path / "k.parquet.tmp").is_dir()
    t, f = read_trace(out), read_trace(full)
    assert not t.complete and t.num_steps == 4
    np.testing.assert_array_equal(t.experts, f.experts[: t.num_tokens])
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "replay", str(out) + ".tmp", "-p", "lru", "-c", "2",
                        "-f", "json", "-j", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "incomplete recording" in r.stderr, r.stderr       # replayed, and said so
    assert json.loads(r.stdout)["requests"] > 0
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "live", "--trace", str(out) + ".tmp", "--model",
                        "tiny-mixtral", "--dry-run", "--format", "json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "incomplete recording" in r.stderr, r.stderr


def test_sigkill_leaves_flushed_parts_readable(tmp_path):
    out = tmp_path / "s.parquet"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from tracekit.record import hooks
        from tracekit.record.recorder import record
        orig, n = hooks.RoutingHooks.end_step, [0]
        def end_step(self, *a, **k):
            n[0] += 1
            if n[0] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, *a, **k)
        hooks.RoutingHooks.end_step = end_step
        record(out={str(out)!r}, prompts={PROMPTS!r}, max_new_tokens=8, flush_steps=2, eos_token_id=[])
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    t = read_trace(out)
    assert not t.complete and t.num_steps == 4 and t.num_tokens > 0


@pytest.mark.parametrize("arch,extra", [("qwen3_moe", {"mlp_only_layers": [1]}), ("olmoe", {})])
def test_adapters_qwen3_moe_and_olmoe(arch, extra, tmp_path):
    loaded = _tiny(arch, **extra)
    calls, handles = _spy(loaded.model)
    try:
        record(out=tmp_path / "q.parquet", loaded=loaded, prompts=PROMPTS, max_new_tokens=4, batch_size=4,
               hidden="full", eos_token_id=[])
    finally:
        for h in handles:
            h.remove()
    t = read_trace(tmp_path / "q.parquet")
    assert t.meta["moe_layer_ids"] == ([0, 2] if extra else [0, 1, 2])
    assert t.num_layers == len(t.meta["moe_layer_ids"]) and t.hidden.shape[1:] == (t.num_layers, 64)
    _check_against_spy(loaded, t, calls, PROMPTS, 4)
    _assert_topk_from_logits(t, renormalize=bool(loaded.model.config.norm_topk_prob))


def test_random_weights_meta_init_is_deterministic_and_complete():
    a = load_model("tiny-mixtral", random_weights=True)
    b = load_model("tiny-mixtral", random_weights=True, seed=1234)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q), n
    rot = a.model.model.rotary_emb
    fresh = type(rot)(config=a.model.config)
    assert torch.equal(rot.inv_freq, fresh.inv_freq)
    assert a.info["random_weights"] and a.info["num_hidden_layers"] == 4


def test_mixtral_without_local_weights_names_cache_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as ei:
        resolve("mixtral")
    msg = str(ei.value)
    assert str(tmp_path) in msg and "--model PATH" in msg and "tiny-mixtral" in msg and "--random-weights" in msg
    assert "\n" not in msg
    assert resolve("mixtral", random_weights=True) == ("builtin-mixtral", None)


def test_cli_record_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from tracekit.cli.app import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    existing = tmp_path / "x.parquet"
    existing.write_bytes(b"keep me")
    prompts = tmp_path / "p.txt"
    prompts.write_text("keep these prompts\n")
    (tmp_path / "long.txt").write_text("word " * 3000)                # 15,000 byte tokens (and BOS)
    for name, cfg in (("k6", {"num_experts_per_tok": 6, "num_local_experts": 4}),
                      ("heads", {"num_attention_heads": 5, "num_key_value_heads": 2})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "mixtral", **cfg}))
    for args, needle in [(["--out", str(existing)], "already exists"),
                         (["--prompts", str(prompts), "--out", str(prompts), "--force"], "names the prompts file"),
                         (["--prompts", str(tmp_path / "long.txt"), "--out", str(tmp_path / "lp.parquet")],
                          "15001 tokens; with --max-new-tokens 32 that exceeds the model's context of 2048"),
                         (["--model", str(tmp_path / "k6"), "--random-weights", "--out", str(tmp_path / "k.parquet")],
                          "num_experts_per_tok 6 must be in 1..4"),      # tracebacks mid-recording, a .tmp left
                         (["--model", str(tmp_path / "heads"), "--random-weights", "--out", str(tmp_path / "h.parquet")],
                          "5 attention heads and 2 key/value heads do not divide"),
                         (["--model", "mixtral", "--out", str(tmp_path / "m.parquet")], "--random-weights"),
                         (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "n.parquet")], "nope"),
                         (["--hidden", "proj:0", "--out", str(tmp_path / "h.parquet")], "proj:N"),
                         (["--num-layers", "0", "--out", str(tmp_path / "l.parquet")], "--num-layers must be >= 1"),
                         (["--model", "mixtral", "--random-weights", "--num-layers", "40", "--out",  # built 40
                           str(tmp_path / "l40.parquet")], "the model has 32 layers"),
                         (["--hidden", "proj:64", "--out", str(tmp_path / "p.parquet")], "use --hidden full"),
                         (["--device-map", "bogus", "--out", str(tmp_path / "d.parquet")], "expected one of auto"),
                         (["--device", "bogus", "--out", str(tmp_path / "v.parquet")], "expected cpu or cuda")]:
        with pytest.raises(SystemExit) as ei:
            main(["record", *args])
        err = capsys.readouterr().err
        assert ei.value.code != 0 and needle in err and err.startswith("error: "), err
        assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert existing.read_bytes() == b"keep me" and prompts.read_text() == "keep these prompts\n"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    from tracekit.live import store  # the kernel killed it, silently
    monkeypatch.setattr(store, "host_ram_available", lambda: 10**6)
    with pytest.raises(SystemExit):
        main(["record", "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err
    assert err.startswith("error: the model's weights need") and err.count("\n") == 1, err
    assert not (tmp_path / "l.parquet").exists()               # --num-layers 0 once recorded 4 layers
    assert not (tmp_path / "p.parquet").exists()               # proj:64 of tiny's 64 dims once recorded


def test_cli_record_default_out_makes_traces_folder(tmp_path, monkeypatch, capsys):
    from tracekit.cli.app import main
    from tracekit.trace.reader import read_trace

    monkeypatch.chdir(tmp_path)               # a folder without traces/: the default --out creates it
    try:
        main(["record", "--max-new-tokens", "2", "--batch-size", "2", "--progress"])
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "recorded" in out and "generating" not in out      # the bar once went to stdout
    files = list((tmp_path / "traces").glob("tiny-mixtral-*.parquet"))
    assert len(files) == 1 and read_trace(files[0]).num_layers == 4
    with pytest.raises(SystemExit):           # a named --out in a missing folder is still refused
        main(["record", "--out", str(tmp_path / "nowhere" / "t.parquet")])
    assert "output folder does not exist" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    from tracekit.record.prompts import builtin_prompts, load_prompts

    b = builtin_prompts()
    assert len(b) >= 16 and any("def " in p for p in b) and any("\u4e00" <= c <= "\u9fff" for p in b for c in p)
    (tmp_path / "p.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_prompts(tmp_path / "p.txt")[0] == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    assert load_prompts(tmp_path / "p.jsonl")[0] == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_prompts(tmp_path / "bad.jsonl")


def test_cli_record_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    from tracekit.cli.app import main
    from tracekit.record import recorder

    def interrupted(**kw):                    # as a Ctrl-C mid-run leaves it: a flushed partial recording
        os.makedirs(kw["out"] + ".tmp")
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder, "record", interrupted)
    out = str(tmp_path / "t.parquet")
    with pytest.raises(SystemExit) as ei:
        main(["record", "--out", out])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert ei.value.code == 130 and err == [f"error: interrupted; the partial trace is kept in {out}.tmp "
                                            f"(tracekit inspect {out}.tmp)"]    # exited 2 before
