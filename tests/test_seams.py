"""The seams new methods plug into (docs/architecture.md): predictors, loop events and callbacks, the optimiser
registry, selections, data sources, teacher providers and config sections. Real training on scikit-learn's digits,
in this process (no Ray)."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hpmkd import training
from hpmkd.callbacks import CALLBACKS, Callback, LoopState
from hpmkd.config import SECTIONS, DataConfig, TrainConfig, config_from_data
from hpmkd.data import DataSplits, load_dataset
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.optim import OPTIMIZERS
from hpmkd.predictors import SingleModel, WeightSamples, load_predictor, save_predictor
from hpmkd.registry import ConfigError
from hpmkd.selection import selected_payload
from hpmkd.teachers import PROVIDERS, LocalTeachers, TeacherSpec, load_teacher
from hpmkd.evaluation import evaluate
from hpmkd.training import StageEnv, StageSpec, train_stage

DIGITS = DataConfig(name="digits")
MLP = ModelRef("mlp", {"hidden": 16, "depth": 1})
SHAPE = DataShape(3, (5,))


def digits_spec(name: str = "seams", epochs: int = 3, **train: Any) -> StageSpec:
    return StageSpec(name, 0, DIGITS, MLP, TrainConfig(epochs=epochs, batch_size=64, **train))


def saved(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a checkpoint file holds it: written, and read back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def states_of(spec: StageSpec, env: StageEnv | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stage's result and every epoch's checkpoint state."""
    states: list[dict[str, Any]] = []
    env = env or StageEnv()
    result = train_stage(spec, dataclasses.replace(env, report=lambda metrics, state: states.append(saved(state))))
    return result, states


# --- predictors ------------------------------------------------------------------------------------------------

def test_weight_samples_predict_the_average_of_the_samples_distributions(tmp_path):
    torch.manual_seed(0)
    members = [MLP.build(SHAPE) for _ in range(3)]
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    by_hand = torch.stack([F.softmax(m(x), -1) for m in members]).mean(0)
    predictor = WeightSamples(members[0], [m.state_dict() for m in members])
    torch.testing.assert_close(predictor(x).exp(), by_hand, rtol=0, atol=1e-6)
    path = str(tmp_path / "samples.pt")
    save_predictor(predictor.payload(), path)
    loaded = load_predictor(path, MLP, SHAPE)
    torch.testing.assert_close(loaded(x), predictor(x), rtol=0, atol=0)

    class Rows:  # any BatchSource: evaluate reads only through the protocol
        def __len__(self):
            return len(y)

        def batches(self, batch_size, *, shuffle, seed=0, epoch=0, rank=0, world_size=1):
            for start in range(0, len(y), batch_size):
                yield x[start:start + batch_size], y[start:start + batch_size], torch.arange(start, min(len(y), start + batch_size))

    acc, nll = evaluate(loaded, Rows(), batch_size=4, device=torch.device("cpu"))
    assert nll == pytest.approx(float(-by_hand[torch.arange(6), y].log().mean().detach()), abs=1e-6)
    assert acc == pytest.approx(float((by_hand.argmax(1) == y).float().mean()))


def test_a_single_model_predictor_is_its_plain_state_dict_and_scores_with_its_logits(tmp_path):
    torch.manual_seed(1)
    model = MLP.build(SHAPE)
    path = str(tmp_path / "model.pt")
    save_predictor(SingleModel(model).payload(), path)
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())  # usable as a teacher checkpoint
    x = torch.randn(4, 5)
    torch.testing.assert_close(load_predictor(path, MLP, SHAPE)(x), model(x), rtol=0, atol=0)


def test_a_weight_sample_predictor_serves_as_a_teacher(tmp_path):
    torch.manual_seed(2)
    members = [MLP.build(SHAPE) for _ in range(2)]
    path = str(tmp_path / "samples.pt")
    save_predictor(WeightSamples(members[0], [m.state_dict() for m in members]).payload(), path)
    teacher = load_teacher(TeacherSpec("bayes", MLP, SHAPE), path)
    x = torch.randn(3, 5)
    logits, _ = teacher.forward(x)
    torch.testing.assert_close(logits.exp(), (F.softmax(members[0](x), -1) + F.softmax(members[1](x), -1)) / 2,
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="predictions only"):
        teacher.forward(x, ["net.0"])


# --- the loop: events, optimisers, selection ------------------------------------------------------------------

class EventLog(Callback):
    """Records every event of the stage named ``events``; adds a metric at evaluation."""

    events: list[str] = []

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return state.spec.name == "events"

    def on_start(self, state):
        self.events.append("on_start")

    def on_epoch_start(self, state):
        self.events.append(f"epoch{state.epoch}")

    def after_backward(self, state):
        assert all(p.grad is not None for p in state.model.parameters())
        self.events.append("after_backward")

    def after_step(self, state):
        self.events.append(f"after_step{state.step}")

    def on_evaluate(self, state, metrics):
        metrics["event_test"] = float(state.epoch)
        self.events.append("on_evaluate")

    def end_of_epoch(self, state, metrics):
        assert "event_test" in metrics
        self.events.append("end_of_epoch")


def test_the_loop_calls_every_event_in_order(monkeypatch):
    monkeypatch.setitem(CALLBACKS._entries, "event_log", EventLog)
    EventLog.events = []
    result = train_stage(digits_spec("events", epochs=2), StageEnv())
    steps = math.ceil(len(load_dataset("digits", **DIGITS.loader_kwargs(0)).train) / 64)
    expected = ["on_start"]
    for epoch in range(2):
        expected.append(f"epoch{epoch}")
        for step in range(epoch * steps + 1, (epoch + 1) * steps + 1):
            expected += ["after_backward", f"after_step{step}"]
        expected += ["on_evaluate", "end_of_epoch"]
    assert EventLog.events == expected
    assert [h["event_test"] for h in result["history"]] == [0.0, 1.0]


class PhaseSwitch(Callback):
    """A two-phase stage: SGD, then from epoch 2 on Adam at a tenth of the learning rate (what a sampling phase
    does with its own optimiser). Its state (the phase) is checkpointed."""

    state_key = "phase"

    @classmethod
    def applies(cls, state: LoopState) -> bool:
        return state.spec.name == "phases"

    def __init__(self):
        self.phase = 0

    def on_start(self, state):
        if self.phase == 1:
            self.switch(state)

    def on_epoch_start(self, state):
        if state.epoch == 2 and self.phase == 0:
            self.phase = 1
            self.switch(state)

    def switch(self, state):
        state.optimizer = torch.optim.Adam(state.model.parameters(), lr=state.spec.train.lr / 10)
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda s: 1.0)

    def state_dict(self):
        return self.phase

    def load_state_dict(self, state):
        self.phase = state


def test_a_callback_can_switch_optimiser_and_a_resumed_stage_continues_bit_for_bit(monkeypatch):
    monkeypatch.setitem(CALLBACKS._entries, "phase_switch", PhaseSwitch)
    spec = digits_spec("phases", epochs=4)
    whole, states = states_of(spec)
    assert states[-1]["phase"] == 1 and "exp_avg" in str(states[-1]["optimizer"]["state"])  # Adam's moments
    for stop in (1, 2):  # interrupted before the switch, and in the second phase
        resumed, later = states_of(spec, StageEnv(resume_state=states[stop]))
        assert resumed["resumed_at_epoch"] == stop + 1
        for key, value in states[-1]["model"].items():
            assert torch.equal(later[-1]["model"][key], value), (stop, key)
        assert resumed["history"] == whole["history"][: stop + 1] + resumed["history"][stop + 1:]
        assert [h["val_acc"] for h in resumed["history"]] == [h["val_acc"] for h in whole["history"]]


def test_an_optimiser_registered_by_name_is_used_with_its_options(monkeypatch):
    built: list[dict[str, Any]] = []

    def sgd_no_momentum(params, cfg, dampening: float = 0.0):
        built.append({"dampening": dampening})
        return torch.optim.SGD(params, lr=cfg.lr, dampening=dampening)

    monkeypatch.setitem(OPTIMIZERS._entries, "plain_sgd", sgd_no_momentum)
    result, states = states_of(digits_spec(epochs=1, optimizer="plain_sgd", optimizer_options={"dampening": 0.5}))
    assert built == [{"dampening": 0.5}]
    assert states[-1]["optimizer"]["param_groups"][0]["momentum"] == 0
    with pytest.raises(ConfigError, match=r"train\.optimizer_options\.damping: unknown option for optimizer 'plain_sgd'"):
        config_from_data({"experiment": "x", "pipeline": "kd", "teachers": [{"name": "t", "model": "mlp"}],
                          "student": {"model": "mlp"}, "train": {"optimizer": "plain_sgd",
                                                                 "optimizer_options": {"damping": 0.1}}})


def test_the_selected_predictor_is_the_best_validation_epoch_and_is_tested_once():
    result, states = states_of(digits_spec(epochs=3))
    best = max(range(3), key=lambda e: (result["history"][e]["val_acc"], -e))
    assert result["selected_epoch"] == best and result["val_acc"] == result["history"][best]["val_acc"]
    payload = selected_payload(states[-1])
    assert all(torch.equal(payload[k], v) for k, v in states[best]["model"].items())
    # the registered test metrics, on the selected model's predictions (the Brier score by hand)
    splits = load_dataset("digits", **DIGITS.loader_kwargs(0))
    model = MLP.build(splits.shape)
    model.load_state_dict(payload)
    with torch.no_grad():
        probs = F.softmax(model(splits.test.x), -1)
    onehot = F.one_hot(splits.test.y, 10).float()
    assert result["test_brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), rel=1e-6)
    assert result["test_acc"] == pytest.approx(float((probs.argmax(1) == splits.test.y).float().mean()))


# --- data sources ----------------------------------------------------------------------------------------------

class StreamedSource:
    """A source that holds no tensor of the whole split: each row is read on demand (as files decoded by worker
    processes would be)."""

    def __init__(self, split):
        self.read = lambda i: (split.x[i], split.y[i])
        self.count = len(split)

    def __len__(self):
        return self.count

    def rows(self, index):
        pairs = [self.read(int(i)) for i in index]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def batches(self, batch_size, *, shuffle, seed=0, epoch=0, rank=0, world_size=1):
        from hpmkd.data.batching import iterate_batches

        return iterate_batches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size)


def test_the_loop_trains_the_same_from_a_streamed_source(monkeypatch):
    in_memory = train_stage(digits_spec(epochs=2), StageEnv())

    def streamed(name, **kwargs) -> DataSplits:
        splits = load_dataset(name, **kwargs)
        return dataclasses.replace(splits, **{k: StreamedSource(getattr(splits, k)) for k in ("train", "val", "test")})

    monkeypatch.setattr(training, "load_dataset", streamed)
    from_stream = train_stage(digits_spec(epochs=2), StageEnv())
    assert [h["val_acc"] for h in from_stream["history"]] == [h["val_acc"] for h in in_memory["history"]]
    assert from_stream["test_acc"] == in_memory["test_acc"]


# --- teacher providers and config sections ---------------------------------------------------------------------

class PriorTeacher:
    """A non-torch teacher: the training split's class frequencies, read from a text file."""

    @staticmethod
    def serves(ref: ModelRef) -> bool:
        return ref.model == "class_prior"

    @staticmethod
    def read(path: str) -> list[float]:
        return [float(v) for v in open(path).read().split()]

    @classmethod
    def build(cls, spec: TeacherSpec, weights: list[float]) -> "PriorTeacher":
        teacher = cls()
        teacher.log_prior = torch.tensor(weights).log()
        return teacher

    def forward(self, x, taps=()):
        return self.log_prior.expand(len(x), -1), {}

    def to(self, device):
        return self


def test_a_registered_non_torch_teacher_is_configured_and_served(monkeypatch, tmp_path):
    monkeypatch.setitem(PROVIDERS._entries, "class_prior", PriorTeacher)
    path = tmp_path / "prior.txt"
    path.write_text("0.5 0.25 0.25")
    data = {"experiment": "x", "pipeline": "kd", "student": {"model": "mlp"},
            "teachers": [{"name": "prior", "model": "class_prior", "checkpoint": str(path)}]}
    assert config_from_data(data).teachers[0].ref == ModelRef("class_prior")
    with pytest.raises(ConfigError, match=r"student\.model: unknown model 'class_prior'"):
        config_from_data({**data, "student": {"model": "class_prior"}})  # a student is a torch model
    teacher = load_teacher(TeacherSpec("prior", ModelRef("class_prior"), SHAPE), str(path))
    out = LocalTeachers(["prior"], [teacher]).request(torch.zeros(2, 5), torch.arange(2), [[]])()
    torch.testing.assert_close(out.logits.exp(), torch.tensor([[[0.5, 0.25, 0.25]] * 2]))


@dataclasses.dataclass
class ProbeSection:
    rounds: int = 1

    def check(self, path: str) -> None:
        if self.rounds < 1:
            raise ConfigError(f"{path}.rounds: must be >= 1, got {self.rounds}.")


def test_a_pipeline_registers_its_own_section_without_editing_the_config(monkeypatch):
    monkeypatch.setitem(SECTIONS._entries, "probe", ProbeSection)
    base = {"experiment": "x", "pipeline": "kd", "teachers": [{"name": "t", "model": "mlp"}], "student": {"model": "mlp"}}
    assert config_from_data(base).probe == ProbeSection()
    cfg = config_from_data(base, ["probe.rounds=3"])
    assert cfg.probe.rounds == 3 and cfg.as_dict()["probe"] == {"rounds": 3}
    assert cfg.with_overrides({"probe.rounds": 5}).probe.rounds == 5 and cfg.probe.rounds == 3
    with pytest.raises(ConfigError, match=r"probe\.rounds: must be >= 1"):
        config_from_data(base, ["probe.rounds=0"])
    with pytest.raises(ConfigError, match=r"prob: unknown key\. Did you mean 'probe'"):
        config_from_data({**base, "prob": {}})
