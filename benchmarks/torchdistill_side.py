"""The torchdistill half of ``vs_torchdistill.py``: run by the interpreter of ``benchmarks/.venv-torchdistill``.

    benchmarks/.venv-torchdistill/bin/python benchmarks/torchdistill_side.py SETTINGS.json RESULT.json

Builds the same teacher (weights from the file hpmkd's side also loads), student, Fashion-MNIST splits (hpmkd's
loader, so the rows are identical) and recipe as hpmkd's side, and trains with torchdistill's own machinery:
``get_distillation_box`` with a ``WeightedSumLoss`` of one ``KDLoss`` (``alpha · CE + beta · T² · KL``), SGD,
``CosineAnnealingLR`` stepped every iteration, and the loop of torchdistill's example ``image_classification.py``
(``pre_epoch_process`` / ``forward_process`` / ``post_forward_process`` / ``post_epoch_process``) over its
``DataLoader`` (``RandomSampler``, ``BaseDatasetWrapper``). Like hpmkd, it evaluates on validation after every
epoch (inside the epoch time), keeps the weights of the best epoch and reads the test split once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torchdistill
from torch.utils.data import RandomSampler, TensorDataset
from torchdistill.core.distillation import get_distillation_box

from hpmkd.data import load_dataset
from hpmkd.models import create_model
from hpmkd.evaluation import evaluate


def main(settings_path: str, result_path: str) -> None:
    s = json.loads(Path(settings_path).read_text())
    torch.set_num_threads(1)
    splits = load_dataset("fashion_mnist", **s["data"])
    build = lambda m: create_model(m["model"], num_classes=10, in_channels=1, input_shape=(1, 28, 28), **m["options"])  # noqa: E731
    teacher = build(s["teacher"])
    teacher.load_state_dict(torch.load(s["teacher_weights"], weights_only=True))
    teacher.eval()
    torch.manual_seed(s["seed"])
    student = build(s["student"])
    steps = s["epochs"] * -(-len(splits.train) // s["batch_size"])
    train_config = {
        "num_epochs": s["epochs"],
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": s["batch_size"], "num_workers": 0}, "requires_supp": True},
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": s["lr"], "momentum": s["momentum"],
                                               "weight_decay": s["weight_decay"]}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": steps, "eta_min": 0.0}, "scheduling_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": s["T"], "alpha": s["ce_weight"], "beta": s["kd_weight"], "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": TensorDataset(splits.train.x, splits.train.y)},
                               train_config, torch.device("cpu"), None, False, 1)
    epoch_times, val_accs, best = [], [], (-1.0, None)
    for epoch in range(s["epochs"]):
        began = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
        val_acc, _ = evaluate(student, splits.val, s["eval_batch_size"], torch.device("cpu"))
        epoch_times.append(time.perf_counter() - began)
        val_accs.append(val_acc)
        if val_acc > best[0]:
            best = (val_acc, {k: v.detach().clone() for k, v in student.state_dict().items()})
    student.load_state_dict(best[1])
    test_acc, _ = evaluate(student, splits.test, s["eval_batch_size"], torch.device("cpu"))
    Path(result_path).write_text(json.dumps({"epoch_times": epoch_times, "val_accs": val_accs, "test_acc": test_acc,
                                             "torchdistill": torchdistill.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
