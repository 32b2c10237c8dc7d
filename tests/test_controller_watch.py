"""Issue 12: radii that limit and radii that are watched; monitoring is passive (NaN and inf gradients
included); ``"set"`` mode follows the learning-rate schedule; the probe schedule's ``r`` trigger belongs to
``"clip"`` and ``"set"``.

References are independent of the code under test: a plain ``Trainer`` run (bit for bit), hand-computed
linear-decay learning rates, and float64 radii from ``torch.func.jvp`` (``tests.references.reference_rho``).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_ghosts import RhoCallback, RhoController, RhoTrainer, RhoTrainingArguments
from hf_ghosts.policy import ProbeSchedule, probe_due
from tests.helpers import (
    StepRecorder,
    backward,
    batch_of,
    classifier,
    flat_norm,
    rho_args,
    tiny_causal_lm,
    token_dataset,
    weights,
)
from tests.references import AdamWReplay, reference_rho

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- the probe schedule
def test_probe_due_r_trigger_is_for_clip_and_set_only() -> None:
    schedule = ProbeSchedule(every=16, trigger_r=0.5, trigger_growth=2.0)
    for mode in ("clip", "set"):
        assert probe_due(schedule, 3, 1.1, 0.6, 1.0, mode) is True  # 0.6 > 0.5 * 1
        assert probe_due(schedule, 3, 1.1, 0.4, 1.0, mode) is False
    assert probe_due(schedule, 3, 1.1, 100.0, 1.0, "monitor") is False  # the r trigger does not fire
    assert probe_due(schedule, 3, 2.5, 0.0, 1.0, "monitor") is True  # growth does
    assert probe_due(schedule, 16, 1.0, 0.0, 1.0, "monitor") is True  # so does every
    assert probe_due(schedule, None, 1.0, 0.0, 1.0, "monitor") is True  # no usable rho
    assert probe_due(ProbeSchedule(every=1), 0, 1.0, 0.0, 1.0, "monitor") is True


def test_monitor_probes_every_k_steps_where_clip_probes_on_r() -> None:
    """A plain loop whose steps lie far outside the radius: clip probes each of them, monitor every 4th."""
    probed = {}
    for mode in ("clip", "monitor"):
        model = classifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.3)
        controller = RhoController(model, optimizer, radii=("output",), mode=mode, r_target=1.0, every=4,
                                   trigger_growth=math.inf)
        records = []
        for step in range(8):
            batch = batch_of(step)
            backward(model, batch)
            records.append(controller.step(batch))
        probed[mode] = [record.probed for record in records]
        assert max(record.r for record in records) > 1.0, "the learning rate is meant to put steps outside the radius"
    assert probed["monitor"] == [True, False, False, False, True, False, False, False]
    assert all(probed["clip"])


# ----------------------------------------------------------------------------- watched radii
def test_a_radius_in_both_settings_is_refused_naming_both(tmp_path) -> None:
    model = classifier()
    with pytest.raises(ValueError, match=r"RhoController: \['output'\] in both radii and watch_radii"):
        RhoController(model, torch.optim.AdamW(model.parameters()), radii=("output",), watch_radii=("output",))
    with pytest.raises(ValueError, match=r"RhoTrainingArguments: \['ffn'\] in both rho_radii and rho_watch_radii"):
        rho_args(tmp_path, rho_radii=["output", "ffn"], rho_watch_radii=["ffn"])
    with pytest.raises(ValueError, match=r"RhoCallback: \['attention'\] in both radii and watch_radii"):
        RhoCallback(radii=("attention",), watch_radii=("attention",))
    with pytest.raises(ValueError, match=r"RhoTrainingArguments\.rho_watch_radii: got \('logits',\)"):
        rho_args(tmp_path, rho_watch_radii=["logits"])


def test_watched_radii_are_logged_and_never_scale_the_update(tmp_path) -> None:
    """Clip on output + attention while watching both FFN forms, against clip on output + attention alone: the same
    weights bit for bit; the FFN kink proxy (far below the others on GPT-NeoX) shows as "would bind"."""
    finals, logs, records = {}, {}, {}
    for kind, watch in (("limit", []), ("watch", ["ffn", "ffn_activation"])):
        model = tiny_causal_lm("gpt_neox")
        args = rho_args(tmp_path / kind, max_steps=4, logging_steps=4, learning_rate=0.05, rho_radii=["output", "attention"],
                        rho_watch_radii=watch, rho_every=1)
        trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset())
        recorder = StepRecorder(lambda trainer=trainer: trainer.rho_controller)
        trainer.add_callback(recorder)
        trainer.train()
        finals[kind] = {name: p.detach().clone() for name, p in model.named_parameters()}
        (logs[kind],) = [entry for entry in trainer.state.log_history if "loss" in entry]
        records[kind] = recorder.records
    assert all(torch.equal(finals["watch"][name], value) for name, value in finals["limit"].items())
    watched, entry = records["watch"], logs["watch"]
    assert any(record.clipped for record in watched), "the learning rate is meant to clip on the limiting radii"
    for record in watched:
        assert record.rho == min(record.rho_out, record.rho_attn)  # the watched radii do not enter rho
        assert record.rho_ffn < record.rho and record.would_bind == "ffn"
        assert record.rho_ffn_activation == math.inf  # exact GELU: entire
        assert record.bottleneck in ("output", "attention")
    assert entry["ghosts/would_bind/ffn"] == 4.0 and entry["ghosts/would_bind/ffn_activation"] == 0.0
    assert entry["ghosts/bottleneck/output"] + entry["ghosts/bottleneck/attention"] == 4.0
    assert entry["ghosts/rho_ffn"] == min(record.rho_ffn for record in watched)
    assert entry["ghosts/rho_ffn_activation"] == math.inf
    assert "ghosts/would_bind/ffn" not in logs["limit"] and "ghosts/rho_ffn" not in logs["limit"]


# ----------------------------------------------------------------------------- passive monitoring
class NonFiniteGradient(TrainerCallback):
    """Writes ``value`` into one gradient entry just before the optimizer step ``at`` (after Trainer's clipping)."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value = at, value

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step + 1 == self.at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = self.value


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The float32 tensor's bit pattern (NaN == NaN, -0 != +0)."""
    return tensor.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
@pytest.mark.slow
def test_nonfinite_gradient_under_monitor_and_callback_is_bit_identical_to_plain_trainer(tmp_path, value, max_grad_norm) -> None:
    finals, optim_states, entries = {}, {}, {}
    for kind in ("plain", "callback", "monitor"):
        model = tiny_causal_lm("gpt_neox")
        args = rho_args(tmp_path / kind, max_steps=4, logging_steps=4, learning_rate=0.05, rho_mode="monitor",
                        rho_every=1, max_grad_norm=max_grad_norm)
        trainer_cls = RhoTrainer if kind == "monitor" else Trainer
        trainer = trainer_cls(model=model, args=args, train_dataset=token_dataset(), callbacks=[NonFiniteGradient(3, value)])
        if kind == "callback":
            RhoCallback.install(trainer, every=1)
        trainer.train()
        finals[kind] = {name: bits(p) for name, p in model.named_parameters()}
        optim_states[kind] = trainer.optimizer.state_dict()["state"]
        entries[kind] = [entry for entry in trainer.state.log_history if "loss" in entry]
    for kind in ("callback", "monitor"):
        assert all(torch.equal(finals[kind][name], plain) for name, plain in finals["plain"].items()), kind
        for index, state in optim_states["plain"].items():
            for key, tensor in state.items():
                assert torch.equal(bits(optim_states[kind][index][key].float()), bits(tensor.float())), (kind, key)
        (entry,) = entries[kind]
        assert entry["ghosts/would_skip"] == 2.0, kind  # step 3's gradient; step 4's (weights now NaN) too
        assert entry["ghosts/skipped_nonfinite"] == 0.0
    assert any(torch.isnan(bits(t).view(torch.float32)).any() for t in finals["plain"].values()), "the NaN step must land"


def test_clip_still_skips_a_nan_gradient(tmp_path) -> None:
    """The same NaN under clip: the step is skipped and the weights stay finite (what monitoring reports as would_skip)."""
    model = tiny_causal_lm("gpt_neox")
    args = rho_args(tmp_path, max_steps=4, logging_steps=4, learning_rate=0.05, rho_every=1)
    trainer = RhoTrainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[NonFiniteGradient(3, math.nan)])
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert entry["ghosts/skipped_nonfinite"] == 1.0 and entry["ghosts/would_skip"] == 0.0


# ----------------------------------------------------------------------------- set mode follows the schedule
def test_plain_loop_set_mode_follows_a_linear_decay() -> None:
    """``r_applied = r_target * lr(t) / lr(0)`` under ``LambdaLR`` linear decay, checked against float64 radii."""
    model = classifier()
    peak, steps, r_target = 1e-3, 6, 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
    replay = AdamWReplay(model, optimizer)
    controller = RhoController(model, optimizer, radii=("output",), mode="set", r_target=r_target)
    for step in range(steps):
        batch = batch_of(step)
        backward(model, batch)
        old = weights(model)
        u = replay.propose()
        record = controller.step(batch)
        scheduler.step()
        expected = r_target * (1 - step / steps)  # lr(t) / peak by hand
        rho = reference_rho(model, old, u, batch["x"])
        applied = {name: p.detach() - old[name] for name, p in model.named_parameters()}
        assert record.target == pytest.approx(expected, rel=1e-12)
        assert record.r_applied == pytest.approx(expected, rel=1e-6)
        assert flat_norm(applied) / rho == pytest.approx(expected, rel=1e-4)
    assert controller.peak_lr == peak


@pytest.mark.parametrize("set_schedule", [True, False])
def test_rho_trainer_set_mode_follows_warmup_and_linear_decay(tmp_path, set_schedule: bool) -> None:
    steps, warmup, peak = 8, 2, 0.02
    args = rho_args(tmp_path, max_steps=steps, learning_rate=peak, rho_mode="set", rho_target=0.5, warmup_steps=warmup,
                    lr_scheduler_type="linear", rho_set_schedule=set_schedule, rho_every=1)
    trainer = RhoTrainer(model=tiny_causal_lm("gpt_neox"), args=args, train_dataset=token_dataset())
    recorder = StepRecorder(lambda: trainer.rho_controller)
    trainer.add_callback(recorder)
    trainer.train()
    # transformers' linear schedule with warm-up, by hand: lr(t) / peak at optimizer step t (0-based)
    shape = [t / warmup if t < warmup else (steps - t) / (steps - warmup) for t in range(steps)]
    for t, record in enumerate(recorder.records):
        expected = 0.5 * shape[t] if set_schedule else 0.5
        if record.update_norm == 0.0:  # lr 0 at the first warm-up step: AdamW proposes nothing
            assert shape[t] == 0.0
            continue
        assert record.target == pytest.approx(expected, rel=1e-9)
        assert record.r_applied == pytest.approx(expected, rel=1e-6)
    assert recorder.records[0].update_norm == 0.0 and len(recorder.records) == steps


def test_set_schedule_is_a_documented_argument() -> None:
    args = RhoTrainingArguments(output_dir="unused", rho_mode="set", rho_set_schedule=False, report_to=[])
    assert args.rho_settings().set_schedule is False
    with pytest.raises(ValueError, match=r"rho_set_schedule: got 'yes'"):
        RhoTrainingArguments(output_dir="unused", rho_set_schedule="yes", report_to=[])
