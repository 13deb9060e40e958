import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatbot.checkpoint import Progress, rank_batches, saved_progress
from chatbot.train import ResumeError, TrainConfig, lr_factor, machine_settings, train


def tiny_config(out, corpus, **kw) -> TrainConfig:
    base = dict(out=str(out), preset="tiny", data=str(corpus), vocab_size=512, warmup_steps=2, schedule="inverse_sqrt",
                lr=3e-3, batch_tokens=1024, eval_every=100, valid_examples=64, save_every=100, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_resume_is_exact(tmp_path, small_corpus):
    """3 steps, stop, resume to 6 == 6 steps straight: model, optimizer, scheduler, RNG and data position."""
    train(tiny_config(tmp_path / "straight", small_corpus, max_steps=6))
    train(tiny_config(tmp_path / "split", small_corpus, max_steps=3))
    state = json.loads((tmp_path / "split" / "train_state" / "trainer.json").read_text())
    assert state["step"] == 3 and state["progress"]["epoch_batches_done"] == 3
    train(tiny_config(tmp_path / "split", small_corpus, max_steps=6))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the 3-step model really is different, so the comparison can fail
    c = tiny_config(tmp_path / "three", small_corpus, max_steps=3)
    train(c)
    assert not torch.equal(weights(tmp_path / "three")["embedding.weight"], a["embedding.weight"])


def test_resume_with_a_different_config_is_refused(tmp_path, small_corpus):
    train(tiny_config(tmp_path / "run", small_corpus, max_steps=2))
    with pytest.raises(ResumeError, match=r"lr: saved 0.003, now 0.001"):
        train(tiny_config(tmp_path / "run", small_corpus, max_steps=4, lr=1e-3))
    with pytest.raises(ResumeError, match=r"block_type"):
        train(tiny_config(tmp_path / "run", small_corpus, max_steps=4, block_type="vanilla"))


def test_training_lowers_validation_perplexity_and_logs_metrics(tmp_path, small_corpus):
    out = tmp_path / "run"
    train(tiny_config(out, small_corpus, max_steps=40, eval_every=20, lr=5e-3))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [e["perplexity"] for e in events if e["event"] == "valid"]
    assert len(valid) == 2 and valid[1] < valid[0] < 512  # below uniform, and improving
    train_events = [e for e in events if e["event"] == "train"]
    assert all(e["tokens_per_s"] > 0 and e["lr"] > 0 for e in train_events)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_schedules():
    cfg = TrainConfig(out="x", warmup_steps=10, max_steps=110)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5) and lr_factor(110, cfg) == pytest.approx(0.0)
    inv = TrainConfig(out="x", warmup_steps=100, schedule="inverse_sqrt")
    assert lr_factor(399, inv) == pytest.approx(0.5)


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_two_cpu_processes(tmp_path, small_corpus, extra):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatbot.cli",
           "train", "--preset", "tiny", "--data", str(small_corpus), "--vocab-size", "512", "--out", str(out),
           "--max-steps", "4", "--warmup-steps", "1", "--batch-tokens", "1024", "--eval-every", "4",
           "--valid-examples", "32", "--save-every", "2", "--no-progress", *extra]
    env_run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    state = json.loads((out / "train_state" / "trainer.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2 and set(state["rng"]) == {"0", "1"}
    assert state["rng"]["0"] != state["rng"]["1"]  # dropout streams differ per rank
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "valid"] == [4]
    from chatbot.modeldir import load_model

    assert load_model(out).model.num_parameters() > 0


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, small_corpus):
    out = tmp_path / "run"
    train(tiny_config(out, small_corpus, max_steps=4, log_every=1, save_every=2))
    # pretend the process died after logging step 4 but the checkpoint on disk is step 2's
    state = out / "train_state" / "trainer.json"
    saved = json.loads(state.read_text())
    train(tiny_config(tmp_path / "two", small_corpus, max_steps=2, log_every=1, save_every=2))
    for name in ("model.safetensors", "train_state/optimizer.pt", "train_state/trainer.json"):
        (out / name).write_bytes((tmp_path / "two" / name).read_bytes())
    assert saved["step"] == 4
    train(tiny_config(out, small_corpus, max_steps=4, log_every=1, save_every=2))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_across_a_precision_switch(tmp_path, small_corpus):
    """fp32 for 3 steps, then bf16 autocast to 6 (a machine with AMX next session): the run continues from
    step 3 on its data position, and its bf16 steps really differ from fp32 ones."""
    train(tiny_config(tmp_path / "run", small_corpus, max_steps=3, precision="fp32"))
    train(tiny_config(tmp_path / "run", small_corpus, max_steps=6, precision="bf16"))
    state = json.loads((tmp_path / "run" / "train_state" / "trainer.json").read_text())
    assert state["step"] == 6 and state["progress"]["epoch_batches_done"] == 6
    assert state["train_config"]["precision"] == "bf16"
    train(tiny_config(tmp_path / "fp32", small_corpus, max_steps=6, precision="fp32"))
    a, b = weights(tmp_path / "run"), weights(tmp_path / "fp32")
    assert not torch.equal(a["embedding.weight"], b["embedding.weight"])  # bf16 GEMMs round differently
    assert torch.allclose(a["embedding.weight"], b["embedding.weight"], atol=5e-2)  # ... but train the same model


def test_machine_settings_follow_the_request_and_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        forced = machine_settings(TrainConfig(out="x", precision="bf16", threads=1), cpu)
        assert forced.amp_dtype == torch.bfloat16 and forced.threads == 1 and torch.get_num_threads() == 1
        assert "asked for" in forced.why
        assert machine_settings(TrainConfig(out="x", precision="fp32"), cpu).amp_dtype is None
        for native in (True, False):
            monkeypatch.setattr("chatbot.train.cpu_has_native_bf16", lambda native=native: native)
            auto = machine_settings(TrainConfig(out="x"), cpu)
            assert auto.amp_dtype == (torch.bfloat16 if native else None), auto.why
        shared = machine_settings(TrainConfig(out="x"), cpu, local_world=64)
        assert shared.threads == 1  # ranks on one box split its cores, at least one each
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(out="x", precision="fp8")


def test_rank_batches_make_the_data_position_independent_of_the_process_count():
    batches = list(range(10))
    assert rank_batches(batches, 0, 1) == batches
    assert rank_batches(batches, 0, 2) == [0, 2, 4, 6, 8] and rank_batches(batches, 1, 2) == [1, 3, 5, 7, 9]
    assert rank_batches(batches, 2, 3) == [2, 5, 8]  # 9 is left over: every rank gets as many
    # after 2 steps on 2 ranks the first 4 batches are done; 1 rank continues at its 4th batch
    assert saved_progress({"progress": {"step": 2, "epoch": 0, "epoch_batches_done": 4}}).epoch_batches_done // 1 == 4
    # a checkpoint written before the change (contiguous shards, per-rank position) still resumes
    assert saved_progress({"step": 3, "epoch": 1, "batch_pos": 3, "world_size": 2}) == Progress(3, 1, 6)


def test_snapshots_are_packed_model_directories(tmp_path, small_corpus):
    from chatbot.modeldir import load_model

    out = tmp_path / "run"
    train(tiny_config(out, small_corpus, max_steps=4, snapshot_every=2, save_every=2))
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snaps == ["step-0000002", "step-0000004"]
    two, four = (load_model(out / "snapshots" / s).model.state_dict() for s in snaps)
    assert not torch.equal(two["embedding.weight"], four["embedding.weight"])
    assert torch.allclose(four["embedding.weight"], weights(out)["embedding.weight"], atol=1e-3)  # fp16 of the latest


def test_train_events_carry_cumulative_time(tmp_path, small_corpus):
    out = tmp_path / "run"
    train(tiny_config(out, small_corpus, max_steps=2, log_every=1))
    train(tiny_config(out, small_corpus, max_steps=4, log_every=1))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    cpu = [e["cpu_seconds"] for e in events]
    assert [e["step"] for e in events] == [1, 2, 3, 4] and cpu == sorted(cpu) and cpu[0] > 0


def test_a_fresh_start_forgets_metrics_of_a_run_that_never_checkpointed(tmp_path, small_corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 20, "loss": 9.0}) + "\n")
    train(tiny_config(out, small_corpus, max_steps=2, log_every=1))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [1, 2]
