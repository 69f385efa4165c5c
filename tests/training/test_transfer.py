"""Fine-tuning by transfer: the policy from the data size, what it freezes and how fast the
rest learns, and the base-vs-tuned comparison on the job's own test split."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lungvit.core.model.checkpoint import load_checkpoint, read_checkpoint_info
from lungvit.cli.main import main as cli_main
from lungvit.core.model.network import create_model
from lungvit.core.predict import Predictor
from lungvit.training.learn.compare import (comparison_scalars, compare_predictions,
                                      describe_comparison, label_metrics)
from lungvit.training.config import TrainConfig, TrainConfigError
from lungvit.training.learn.fit import fit
from lungvit.training.learn.module import scaled_parameter_groups
from lungvit.training.jobs.store_callback import final_metrics
from lungvit.training.learn.transfer import (LARGE_PER_CLASS, LAYER_DECAY, SMALL_PER_CLASS,
                                       choose_policy, describe_run, mix_with_base)

DEPTH = 4  # lungvit_tiny


def _tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lungvit_tiny", num_classes=num_classes, img_size=32)


# ------------------------------------------------------------------------------- policy
@pytest.mark.parametrize(("per_class", "name"), [
    (1, "head"), (SMALL_PER_CLASS - 1, "head"), (SMALL_PER_CLASS, "llrd"),
    (LARGE_PER_CLASS - 1, "llrd"), (LARGE_PER_CLASS, "full"), (5000, "full")])
def test_policy_follows_the_training_images_per_class(per_class: int, name: str) -> None:
    policy = choose_policy({"a": per_class, "b": per_class, "c": per_class}, DEPTH)
    assert policy.name == name and policy.per_class == per_class
    assert str(per_class) in policy.reason and name in policy.describe()


def test_policy_uses_the_median_class_and_can_be_forced() -> None:
    # One huge class does not make a thin data set "large" (the median decides).
    assert choose_policy({"a": 10, "b": 12, "c": 100_000}, DEPTH).name == "head"
    assert choose_policy({"a": 10}, DEPTH, requested="full").name == "full"
    assert choose_policy({"a": 10}, DEPTH, from_checkpoint=False).name == "scratch"
    with pytest.raises(TrainConfigError, match="transfer must be one of"):
        choose_policy({"a": 10}, DEPTH, requested="everything")


def test_head_policy_freezes_all_but_the_last_block_and_slows_it() -> None:
    model = _tiny()
    policy = choose_policy({"a": 20, "b": 20}, DEPTH)
    policy.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, _ in model.named_parameters():
        expect = name.startswith(("blocks.3.", "norm.", "head."))
        assert (name in trainable) == expect, name
    scales = policy.lr_scales(model)
    groups = scaled_parameter_groups(model, 0.05, 1e-3, scales)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(trainable)  # frozen ones are not optimised
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["blocks.3.attn.qkv.weight"])] == pytest.approx(
        1e-3 * policy.block_lr_scale)
    assert policy.block_lr_scale < 1


def test_llrd_policy_decays_the_rate_block_by_block() -> None:
    model = _tiny()
    policy = choose_policy({"a": 100, "b": 100}, DEPTH)
    scales = policy.lr_scales(policy.apply(model))
    assert all(p.requires_grad for p in model.parameters())
    assert scales["head.weight"] == 1.0 and scales["norm.weight"] == 1.0
    for i in range(DEPTH):  # block i is DEPTH - i levels below the head
        assert scales[f"blocks.{i}.mlp.fc1.weight"] == pytest.approx(LAYER_DECAY ** (DEPTH - i))
    assert scales["pos_embed"] == pytest.approx(LAYER_DECAY ** (DEPTH + 1))
    assert scales["patch_embed.proj.weight"] == scales["cls_token"] == scales["pos_embed"]
    full = choose_policy({"a": 1000}, DEPTH)
    assert full.lr_scales(model) is None and full.callbacks() == []


# --------------------------------------------------------------------------- comparison
def test_label_metrics_and_comparison_by_label_name() -> None:
    true = ["a", "a", "b", "b", "c", "c"]
    tuned = ["a", "a", "b", "a", "c", "a"]
    base = ["a", "x", "b", "b", "c", None]  # the base knows a, b, x; None: unreadable
    m = label_metrics(tuned, true)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["macro_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    out = compare_predictions(base, tuned, true, base_labels=["a", "b", "x"])
    # c is unknown to the base: its two scans are left out; 4 scans compared.
    assert out["n_test"] == 4 and out["n_test_total"] == 6
    assert out["classes_unknown_to_base"] == ["c"] and "c left out" in out["note"]
    assert out["base"]["acc"] == pytest.approx(3 / 4)  # "x" for an "a" scan is wrong
    assert out["tuned"]["acc"] == pytest.approx(3 / 4)
    assert out["delta"]["acc"] == pytest.approx(0) and out["better"] is False
    scalars = comparison_scalars(out)
    assert scalars["compare/n_test"] == 4 and scalars["compare/better"] == 0.0
    none = compare_predictions(["p"], ["q"], ["q"], base_labels=["p"])
    assert none["n_test"] == 0 and none["better"] is None and none["delta"] is None
    assert comparison_scalars(none) == {"compare/n_test": 0.0, "compare/n_test_total": 1.0}
    assert "no comparison" in describe_comparison({"base_model": "b", **none})


def _demo(path: Path, per_class: int, classes: tuple[str, ...] = (), seed: int = 1) -> Path:
    args = ["demo-data", str(path), "--per-class", str(per_class), "--size", "64",
            "--seed", str(seed)]
    assert cli_main([*args, "--classes", *classes] if classes else args) == 0
    return path


def _test_files(run_dir: Path, data: Path) -> list[tuple[Path, str]]:
    with open(run_dir / "split.csv", newline="") as f:
        return [(data / r["path"], r["label"]) for r in csv.DictReader(f) if r["split"] == "test"]


def test_fine_tune_freezes_by_policy_and_compares_with_its_base(tmp_path: Path) -> None:
    """A base on four phantom classes, fine-tuned on two of them plus a new one (head policy:
    a few images per class); the comparison is checked against predictions made through
    the app's own decoding path."""
    common = dict(variant="lungvit_tiny", input_size=32, batch_size=8, augment=False,
                  early_stopping_patience=0, cache_dir=str(tmp_path / "cache"))
    base_data = _demo(tmp_path / "base", 6, ("lung-normal", "lung-covid", "lung-oct-cnv",
                                             "lung-opacity"))
    base = fit(TrainConfig(data=str(base_data), out=str(tmp_path / "base.safetensors"),
                           run_dir=str(tmp_path / "base-run"), epochs=2, **common),
               progress=False)
    assert base.transfer["name"] == "scratch" and base.comparison is None
    data = _demo(tmp_path / "ft", 10, ("lung-normal", "lung-covid"), seed=3)
    (data / "lung-new").mkdir()
    for f in sorted((_demo(tmp_path / "extra", 10, ("lung-oct-dme",), seed=4)
                     / "lung-oct-dme").glob("*.png")):
        (data / "lung-new" / f.name).write_bytes(f.read_bytes())
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "tuned.safetensors"),
                      run_dir=str(tmp_path / "tuned-run"), from_checkpoint=str(base.checkpoint),
                      epochs=2, lr=3e-3, **{**common, "variant": None, "input_size": None})
    tuned = fit(cfg, progress=False)

    assert tuned.transfer["name"] == "head" and tuned.transfer["frozen_blocks"] == DEPTH - 1
    assert (tuned.transfer["distill"], base.transfer["distill"]) == (1.0, 0.0)  # the default
    before, _ = load_checkpoint(base.checkpoint)
    after, info = load_checkpoint(tuned.checkpoint)
    b, a = before.state_dict(), after.state_dict()
    for key in ("patch_embed.backbone.0.weight", "patch_embed.backbone.1.running_mean",
                "pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.weight"):
        torch.testing.assert_close(a[key], b[key], msg=key)  # frozen, BatchNorm stats too
    assert not torch.equal(a["blocks.3.attn.qkv.weight"], b["blocks.3.attn.qkv.weight"])
    assert info.metrics["transfer"]["name"] == "head"
    report = json.loads((tuned.run_dir / "report.json").read_text())
    assert report["transfer"]["name"] == "head" and report["comparison"] == info.metrics[
        "comparison"]

    # The comparison, recomputed through the app's decoding path (Predictor).
    files = _test_files(tuned.run_dir, data)
    base_pred = Predictor.from_checkpoint(base.checkpoint)
    tuned_pred = Predictor.from_checkpoint(tuned.checkpoint)
    known = [(p, y) for p, y in files if y in base_pred.labels]
    assert len(known) < len(files)  # lung-new is not a class of the base
    base_ok = [base_pred.predict_files([p]).__next__().label == y for p, y in known]
    tuned_ok = [tuned_pred.predict_files([p]).__next__().label == y for p, y in known]
    c = tuned.comparison
    assert c["n_test"] == len(known) and c["n_test_total"] == len(files)
    assert c["classes_unknown_to_base"] == ["lung-new"]
    # Decoding through the cache quantises to 16 bits: allow one flipped answer at most.
    tol = 1 / len(known) + 1e-9
    assert c["base"]["acc"] == pytest.approx(sum(base_ok) / len(known), abs=tol)
    assert c["tuned"]["acc"] == pytest.approx(sum(tuned_ok) / len(known), abs=tol)
    assert c["delta"]["acc"] == pytest.approx(c["tuned"]["acc"] - c["base"]["acc"])
    assert c["base_model"] == "base.safetensors"

    text = describe_run(tuned.transfer, tuned.comparison)
    assert "transfer policy: head" in text and f"on {len(known)} test scans" in text
    assert "distillation weight 1" in text
    assert "lung-new left out" in describe_comparison(tuned.comparison)
    stored = final_metrics(tuned)
    assert stored["compare/n_test"] == len(known)
    assert stored["compare/base_acc"] == pytest.approx(c["base"]["acc"])
    assert stored["compare/tuned_macro_recall"] == pytest.approx(c["tuned"]["macro_recall"])


def test_comparison_with_a_model_of_another_input_size(tmp_path: Path) -> None:
    """A run from scratch compared with a given model that reads 64 px scans (the run: 32)."""
    data = _demo(tmp_path / "d", 10, ("lung-normal", "lung-covid"))
    other = tmp_path / "other.safetensors"
    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint

    torch.manual_seed(5)
    save_checkpoint(other, create_model("lungvit_tiny", num_classes=2).eval(),
                    CheckpointInfo(labels=("lung-covid", "lung-normal")))
    result = fit(TrainConfig(data=str(data), out=str(tmp_path / "m.safetensors"),
                             run_dir=str(tmp_path / "run"), variant="lungvit_tiny",
                             input_size=32, epochs=1, batch_size=8, augment=False,
                             compare_to=str(other), early_stopping_patience=0,
                             cache_dir=str(tmp_path / "cache")), progress=False)
    files = _test_files(result.run_dir, data)
    predictor = Predictor.from_checkpoint(other)
    assert predictor.preprocess.input_size == 64
    ok = [next(predictor.predict_files([p])).label == y for p, y in files]
    c = result.comparison
    assert result.transfer["name"] == "scratch" and c["n_test"] == len(files)
    assert c["base"]["acc"] == pytest.approx(sum(ok) / len(files), abs=1 / len(files) + 1e-9)
    missing = TrainConfig(data=str(data), out=str(tmp_path / "m2.safetensors"),
                          run_dir=str(tmp_path / "run2"), variant="lungvit_tiny", input_size=32,
                          epochs=1, batch_size=8, augment=False, fast_dev_run=True,
                          compare_to=str(tmp_path / "missing.safetensors"),
                          cache_dir=str(tmp_path / "cache"))
    failed = fit(missing, progress=False)  # the comparison's failure never fails the run
    assert failed.checkpoint is not None and "error" in failed.comparison
    assert comparison_scalars(failed.comparison) == {}
    assert read_checkpoint_info(failed.checkpoint).metrics["comparison"]["error"]


def test_the_job_summary_line_says_better_or_worse() -> None:
    from lungvit.training.jobs.runner import comparison_line

    assert comparison_line({"test/acc": 0.9}) == ""
    line = comparison_line({"compare/n_test": 40.0, "compare/base_acc": 0.5,
                            "compare/tuned_acc": 0.625, "compare/delta_acc": 0.125})
    assert line.startswith("better than the base model by 12.5 points of accuracy")
    assert "on 40 test scans (50.0% -> 62.5%)" in line
    worse = comparison_line({"compare/n_test": 8.0, "compare/base_acc": 0.5,
                             "compare/tuned_acc": 0.375, "compare/delta_acc": -0.125})
    assert worse.startswith("worse than the base model by 12.5 points")


def test_base_mix_moves_the_weights_back_towards_the_base() -> None:
    """Weight-space ensembling: every float tensor is share*base + (1-share)*tuned, computed
    here by hand; new head rows and integer buffers stay as trained."""
    torch.manual_seed(0)
    base = create_model("lungvit_tiny", num_classes=3)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = create_model("lungvit_tiny", num_classes=3)
    tuned.state_dict()["patch_embed.backbone.1.num_batches_tracked"].fill_(7)
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    mix_with_base(tuned, base_state, 0.25, fresh_rows=[2])
    mixed = tuned.state_dict()
    for name, value in mixed.items():
        if not value.is_floating_point():
            assert torch.equal(value, tuned_state[name]), name
            continue
        expected = 0.25 * base_state[name] + 0.75 * tuned_state[name]
        if name in ("head.weight", "head.bias"):
            expected[2] = tuned_state[name][2]
        torch.testing.assert_close(value, expected, msg=name)
    assert not torch.equal(mixed["head.weight"][:2], tuned_state["head.weight"][:2])
    with pytest.raises(ValueError, match="share"):
        mix_with_base(tuned, base_state, 1.0)
    with pytest.raises(TrainConfigError, match="base_mix"):
        TrainConfig(data="d", out="o", base_mix=1.5).validate()


def test_distillation_term_is_the_tempered_kl_to_the_base_over_shared_classes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LwF: loss = cross-entropy + weight * T^2 * KL(teacher || student) over the classes
    the base knows (computed here by hand); the teacher is not trained, saved or switched
    to train mode with the module."""
    import torch.nn.functional as F

    from lungvit.training.learn.module import LungViTModule

    student, teacher = _tiny(3), create_model("lungvit_tiny", num_classes=3, img_size=32)
    module = LungViTModule(student, labels=["a", "b", "new"], teacher=teacher, distill=0.7,
                           distill_temperature=2.0, distill_classes=[0, 1])
    assert not any(k.startswith("_teacher") for k in module.state_dict())
    assert {id(p) for p in module.parameters()} == {id(p) for p in student.parameters()}
    module.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(1)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    got = module.training_step((x, y), 0)
    logits = student(x)
    with torch.no_grad():
        target = F.softmax(teacher(x)[:, [0, 1]] / 2.0, dim=1)
    kl = (target * (target.log() - F.log_softmax(logits[:, [0, 1]] / 2.0, dim=1))).sum(1).mean()
    want = F.cross_entropy(logits, y) + 0.7 * 4.0 * kl
    torch.testing.assert_close(got, want)
    plain = LungViTModule(student, labels=["a", "b", "new"]).train().training_step((x, y), 0)
    torch.testing.assert_close(plain, F.cross_entropy(logits, y))
    for off in ({"distill": 0.0, "distill_classes": [0, 1]},
                {"distill": 0.7, "distill_classes": []}):  # no weight, or no shared class
        unused = LungViTModule(student, labels=["a", "b", "new"], teacher=teacher, **off)
        torch.testing.assert_close(unused.train().training_step((x, y), 0), plain)
    assert got > plain  # the student and teacher disagree, so the term adds
    with pytest.raises(TrainConfigError, match="distill"):
        TrainConfig(data="d", out="o", distill=-1).validate()
    from lungvit.cli.main import build_parser
    from lungvit.cli.runs_cmd import take_job_options
    from lungvit.cli.train_cmd import config_from_args

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--distill", "0"])
    assert take_job_options(args) is None  # leaves the TrainConfig options
    assert config_from_args(args).distill == 0.0
    with pytest.raises(TrainConfigError, match="distill_temperature"):
        TrainConfig(data="d", out="o", distill_temperature=0).validate()
