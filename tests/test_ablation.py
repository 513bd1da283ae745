"""The paired-seed LD ablation: pairing checked, task and metrics correct, tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict

import pytest
import torch
from torch import nn

import gald
import gald.testing
from gald.bench import _ablation_model as am
from gald.bench import _ablation_task as task
from gald.bench.ablation import AblationConfig, main, paired_differences, render


def _variants(seed: int = 3, **kw: object) -> dict[str, am.Segmenter]:
    args = {
        "ga": "psp",
        "channels": 8,
        "num_classes": task.NUM_CLASSES,
        "offset": 2.0,
        "final_act": True,
    }
    args.update(kw)
    return am.build_variants(seed, **args)  # type: ignore[arg-type]


def test_variants_start_from_identical_weights() -> None:
    models = _variants()
    states = {k: m.state_dict() for k, m in models.items()}
    # compared here directly, independently of check_pairing
    for key, value in states["none"].items():
        assert torch.equal(value, states["ga"][key]) and torch.equal(value, states["ld"][key]), key
    for key, value in states["ga"].items():
        assert torch.equal(value, states["ld"][key]), key
    extra = set(states["ld"]) - set(states["ga"])
    assert extra and all(k.startswith("head.gald.ld.") for k in extra)
    assert set(states["ga"]) - set(states["none"]) == {
        k for k in states["ga"] if k.startswith("head.gald.")
    }
    # the slot really holds what the variant says
    assert isinstance(models["none"].head.gald, nn.Identity)
    assert isinstance(models["ga"].head.gald, gald.GALD) and models["ga"].head.gald.ld is None
    assert isinstance(models["ld"].head.gald.ld, gald.LocalDistribution)
    # the weights are not trivially equal: different seeds differ, parts are not all zero
    other = _variants(seed=4)["ld"].state_dict()
    assert not torch.equal(other["backbone.0.0.weight"], states["ld"]["backbone.0.0.weight"])
    # the shared tensors are copies, not aliases (training one variant leaves the others alone)
    p_ga = models["ga"].backbone[0][0].weight
    p_ld = models["ld"].backbone[0][0].weight
    assert p_ga.data_ptr() != p_ld.data_ptr()


def test_pairing_does_not_depend_on_global_rng() -> None:
    torch.manual_seed(123)
    a = _variants()["ld"].state_dict()
    torch.manual_seed(456)
    torch.randn(100)
    b = _variants()["ld"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_dropout_does_not_depend_on_global_rng() -> None:
    from gald.bench.ablation import _train

    cfg = AblationConfig(ga="aspp", channels=8, steps=2, size=32, batch_size=2)
    trained = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        model = _variants(ga="aspp")["ld"]
        assert any(isinstance(m, nn.Dropout2d) and m.p > 0 for m in model.modules())
        _train(model, cfg, seed=3)
        trained.append(model.state_dict())
        after = torch.randn(4)  # the caller's stream is restored, not consumed
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.randn(4))
    a, b = trained
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_pairing_catches_a_difference() -> None:
    models = _variants()
    am.check_pairing(models)
    with torch.no_grad():
        models["ga"].head.cls.bias.add_(1e-6)
    with pytest.raises(RuntimeError, match="different weights.*head.cls.bias"):
        am.check_pairing(models)
    models = _variants()
    with torch.no_grad():
        models["ld"].head.gald.ga.parameters().__next__().mul_(1.0001)
    with pytest.raises(RuntimeError, match="different weights"):
        am.check_pairing(models)
    models = _variants()
    models["ga"].backbone.add_module("extra", nn.Conv2d(8, 8, 1))
    with pytest.raises(RuntimeError, match="outside head.gald"):
        am.check_pairing(models)


def test_task_is_deterministic_and_labelled_as_documented() -> None:
    a = task.make_batch(torch.Generator().manual_seed(1), 3, 32)
    b = task.make_batch(torch.Generator().manual_seed(1), 3, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (3, 3, 32, 32) and y.shape == (3, 32, 32) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < task.NUM_CLASSES
    # small objects exist and only small objects carry a strong blue channel on average
    small = y >= task.LARGE_CLASSES
    assert small.any() and (~small).any()
    assert x[:, 2][small].abs().mean() > 2.0 > x[:, 2][~small].abs().mean()


def test_metrics_against_hand_counts() -> None:
    target = torch.tensor([[0, 0, 1, 4], [0, 2, 1, 5]])
    pred = torch.tensor([[0, 1, 1, 4], [0, 2, 1, 4]])
    conf = task.confusion(pred, target)
    iou = task.class_iou(conf)
    assert iou[0].item() == pytest.approx(2 / 3)  # tp 2, fn 1
    assert iou[1].item() == pytest.approx(2 / 3)  # tp 2, fp 1
    assert iou[2].item() == 1.0
    assert math.isnan(iou[3].item())  # absent everywhere
    assert iou[4].item() == pytest.approx(1 / 2)  # tp 1, fp 1
    assert iou[5].item() == 0.0
    m = task.metrics(conf, conf)
    assert m["large"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)
    assert m["small"] == pytest.approx(100 * 0.25)
    band = task.boundary_band(torch.tensor([[[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]]))
    assert band.tolist() == [
        [[False, False, False, False], [False, False, True, True], [False, False, True, True]]
    ]


def test_paired_differences() -> None:
    runs = {
        s: {
            v: {m: float(s + i) for m in ("large", "small", "boundary", "miou")}
            for i, v in enumerate(("none", "ga", "ld"))
        }
        for s in range(3)
    }
    runs[2]["ld"]["small"] = 0.0  # ld - ga on small: 1, 1, -3
    pd = paired_differences(runs)
    d = pd["ld-ga"]["small"]
    assert d["diffs"] == [1.0, 1.0, -3.0] and d["n"] == 3 and d["wins"] == 2
    assert d["mean"] == pytest.approx(-1 / 3)
    assert d["std"] == pytest.approx(math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2))
    assert pd["ld-none"]["large"]["mean"] == 2.0 and pd["ld-none"]["large"]["std"] == 0.0
    assert d["ci95"] == pytest.approx(4.303 * d["std"] / math.sqrt(3))  # t(2 df) = 4.303
    assert "ld-frozen" not in pd  # no frozen runs given


def test_tiny_end_to_end(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    rc = main(
        [
            "--seeds",
            "2",
            "--steps",
            "2",
            "--size",
            "16",
            "--channels",
            "8",
            "--batch-size",
            "2",
            "--eval-images",
            "2",
            "--ga",
            "gc",
            "--no-final-act",
            "--offset",
            "1",
            "--threads",
            "1",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored
    captured = capsys.readouterr()
    out = captured.out
    # per-seed progress only on a terminal (stdout and stderr are captured here)
    assert "seed 1" not in captured.err and "seed 1" not in out
    first = out.splitlines()[:2]
    assert first[0].startswith("LD ablation: 3 variants (none / ga / ld)")
    assert "says little about full-size training" in first[1]
    # the duration estimate goes to stderr, as the timing benchmark's: stdout holds the report
    assert re.search(
        r"^Expected duration on this machine: (about \d+|under 1) s \(.*\)\.$",
        captured.err,
        flags=re.M,
    )
    assert "Expected duration" not in out
    assert "Paired differences" in out and "ld-ga" in out and "too few seeds" in out
    assert "says little about full-size training" in out.split("How to read this")[1]

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the JSON: not strict JSON")

    res = json.loads(path.read_text(), parse_constant=no_constants)
    assert set(res["runs"]) == {"0", "1"}
    for per_seed in res["runs"].values():
        assert set(per_seed) == {"none", "ga", "ld", "frozen"}
        for r in per_seed.values():
            for metric in ("large", "small", "boundary", "miou"):
                assert 0.0 <= r[metric] <= 100.0
    assert res["config"]["final_act"] is False and res["config"]["offset"] == 1.0
    gate = res["gate"]
    assert len(gate) == 2 and all(1.0 < g["min"] <= g["max"] < 2.0 for g in gate)  # (1, 2)
    assert res["paired"]["ld-ga"]["large"]["n"] == 2
    assert res["paired"]["ld-frozen"]["small"]["n"] == 2
    assert "ld, gate frozen" in out and "ld-frozen" in out


def test_cli_rejects_bad_arguments(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["--seeds", "0"])
    assert "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ga", "nope"])
    with pytest.raises(SystemExit):
        main(["--ga", "cgnl", "--channels", "24"])  # CGNL's 8 groups need C/2 divisible by 8
    assert "--ga cgnl with --channels 24" in capsys.readouterr().err


def test_render_flags_differences_beyond_noise() -> None:
    metrics = ("large", "small", "boundary", "miou")
    runs = {
        s: {
            v: {m: 50.0 + (0.1 * s if m == "large" else 0.0) for m in metrics}
            for v in ("none", "ga", "ld")
        }
        for s in range(4)
    }
    for s in range(4):
        runs[s]["ld"]["small"] = 50.0 + 5.0 + 0.5 * s  # a clear paired gain on small objects
        runs[s]["ld"]["boundary"] = 50.0 + (0.5 if s % 2 else -0.5)  # noise
    res = {
        "config": asdict(AblationConfig()),
        "runs": {str(s): r for s, r in runs.items()},
        "paired": paired_differences(runs),
        "gate": [],
        "seconds": 1.0,
        "cpu_seconds": 2.0,
    }
    lines = render(res).splitlines()
    ld_ga = next(line for line in lines if line.startswith("ld-ga"))
    assert ld_ga.endswith("95% CI excludes 0: small")
    ga_none = next(line for line in lines if line.startswith("ga-none"))
    assert ga_none.endswith("all within noise (95% CI)")
    assert "says little about full-size training" in "\n".join(lines)


def test_the_report_says_when_small_objects_were_not_learned() -> None:
    metrics = ("large", "small", "boundary", "miou")

    def report(small: float) -> str:
        runs = {
            s: {v: {m: (small if m == "small" else 40.0 + s) for m in metrics} for v in ROWS_RUN}
            for s in range(2)
        }
        runs[0]["ld"]["large"] -= 0.01  # a mean difference that rounds to zero, below it
        res = {
            "config": asdict(AblationConfig(steps=30)),
            "runs": {str(s): r for s, r in runs.items()},
            "paired": paired_differences(runs),
            "gate": [],
            "seconds": 1.0,
            "cpu_seconds": 2.0,
        }
        return render(res)

    unlearned = report(0.4)
    assert "no variant learned the small objects (IoU under 1 % for every variant and seed " in (
        unlearned.replace("\n", " ")
    )
    assert "after 30 steps" in unlearned
    assert "not learned" not in report(5.0) and "no variant learned" not in report(5.0)
    ld_ga = next(line for line in unlearned.splitlines() if line.startswith("ld-ga"))
    assert "-0.0" not in ld_ga and ld_ga.split()[1] == "0.0"  # a zero is not shown as a loss
    assert ld_ga.endswith("too few seeds to tell (--seeds 3 or more; 2 here)")


ROWS_RUN = ("none", "ga", "ld")


def test_frozen_and_folded_gate_equal_the_ld_when_its_gate_is_constant() -> None:
    model = _variants(seed=5)["ld"].eval()
    x = torch.randn(2, 3, 64, 64)  # a 16x16 head map: a 2x2 mask grid
    # a trained-like LD: its gate varies, so freezing it changes the output
    ld = model.head.gald.ld
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ld.branch.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 3 + 1)
                m.bias.copy_(torch.rand(m.num_features, generator=gen))
    gate = gald.ld_statistics(model, [x])["head.gald.ld"]
    assert gate.spatial_cv > 0.001
    with torch.no_grad():
        ref = model(x)
        assert not torch.allclose(am.freeze_gate(model, gate.channel_mean)(x), ref, atol=1e-4)
    # the last stage outputs its bias for every input: a gate constant over positions and
    # samples, but different per channel (so a fold along the wrong axis, or of one scalar,
    # would not match)
    last_norm = ld.branch[-1][1]
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.copy_(torch.linspace(0.0, 3.0, last_norm.num_features))  # relu(b) = b
    gate = gald.ld_statistics(model, [x, torch.randn(1, 3, 64, 64) * 5])["head.gald.ld"]
    assert gate.spatial_cv < 1e-6 and gate.sample_cv < 1e-6 and gate.channel_cv > 0.01
    want = 2.0 + torch.sigmoid(
        torch.linspace(0.0, 3.0, last_norm.num_features, dtype=torch.float64)
    )
    torch.testing.assert_close(
        torch.tensor(gate.channel_mean, dtype=torch.float64), want, rtol=1e-6, atol=1e-6
    )
    frozen = am.freeze_gate(model, gate.channel_mean)
    folded = am.fold_gate_into_convb(model, gate.channel_mean)
    assert folded.head.gald.ld is None
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(frozen(x), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'ld' variant"):
        am.freeze_gate(_variants()["ga"], gate.channel_mean)


def test_the_duration_estimate_times_steps_of_every_variant(monkeypatch) -> None:
    from gald.bench import ablation

    clock = iter(range(10_000))  # every perf_counter call one second later: each step takes 1 s
    monkeypatch.setattr(ablation.time, "perf_counter", lambda: float(next(clock)))
    variants = _variants()
    cfg = AblationConfig(seeds=2, steps=10, size=32, batch_size=4, eval_images=8)
    before = {k: copy.deepcopy(m.state_dict()) for k, m in variants.items()}
    # 3 variants x 1 s per step; per seed 10 steps and 2 eval batches for 4 evaluations (a
    # forward being a third of a step)
    expected = 2 * (10 + 2 * 4 / 3 / 3) * 3
    assert ablation.estimate_seconds(variants, cfg) == pytest.approx(expected)
    for k, m in variants.items():  # timed on copies: the variants are untouched
        for name, t in m.state_dict().items():
            assert torch.equal(t, before[k][name]), (k, name)


def test_progress_lines_on_a_terminal_and_strict_json_for_one_seed(
    tmp_path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    path = tmp_path / "one.json"
    argv = ["--seeds", "1", "--steps", "1", "--size", "16", "--channels", "8"]
    argv += ["--batch-size", "2", "--eval-images", "2", "--ga", "gc", "--json", str(path)]
    assert main(argv) == 0
    assert "seed 0   ld: large" in capsys.readouterr().err  # progress on stderr
    text = path.read_text()
    assert "NaN" not in text
    res = json.loads(text)  # one seed: no spread, written as null
    assert any(v is None for d in res["paired"].values() for m in d.values() for v in m.values())
    from gald.bench.docs import render_ablation

    assert "1 seed;" in render_ablation(res)  # the docs' renderer reads the nulls


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 9, 12, 25, 45, 100])
def test_t_quantiles_cover_at_least_95_percent(df: int) -> None:
    """P(|T| <= t95(df)) from the density of Student's t, integrated numerically: at least
    0.95 (never narrower than the exact interval), and within 0.5 % of it at the tabled df."""
    from gald.bench.ablation import _T95, t95

    t = t95(df)
    grid = torch.linspace(0.0, t, 200_001, dtype=torch.float64)
    log_pdf = (
        math.lgamma((df + 1) / 2)
        - math.lgamma(df / 2)
        - 0.5 * math.log(df * math.pi)
        - (df + 1) / 2 * torch.log1p(grid.square() / df)
    )
    covered = 2 * float(torch.trapezoid(log_pdf.exp(), grid))
    assert covered >= 0.95
    if df in _T95:
        assert covered < 0.9505


def test_paired_differences_do_not_count_ties_as_wins():
    """A seed where the two variants score the same is not a win."""
    from gald.bench.ablation import METRICS, paired_differences

    same = {m: 50.0 for m in METRICS}
    runs = {
        0: {"none": same, "ga": same, "ld": same, "frozen": same},
        1: {"none": same, "ga": {**same, "miou": 51.0}, "ld": same, "frozen": same},
    }
    res = paired_differences(runs)
    assert res["ga-none"]["miou"]["wins"] == 1
    assert res["ld-ga"]["large"]["wins"] == 0


def test_check_pairing_refuses_an_ld_variant_that_adds_nothing():
    """The 'ld' variant must add head.gald.ld.* keys; an identical copy of 'ga' is not an
    LD variant."""
    from gald.bench._ablation_model import build_variants, check_pairing

    models = build_variants(0, ga="gc", channels=8, num_classes=3, offset=2.0, final_act=True)
    with pytest.raises(RuntimeError, match="should add exactly head.gald.ld"):
        check_pairing({"ga": models["ga"], "ld": copy.deepcopy(models["ga"])})


def test_run_refuses_variants_that_saw_different_data(monkeypatch):
    """The per-seed data checksum comparison is what proves the pairing."""
    from gald.bench import ablation

    counter = iter(range(100))
    monkeypatch.setattr(ablation, "_train", lambda model, cfg, seed: (float(next(counter)), 0.0))
    cfg = ablation.AblationConfig(
        ga="gc", seeds=1, steps=1, size=32, batch_size=2, channels=8, eval_images=2
    )
    with pytest.raises(RuntimeError, match="saw different training data"):
        ablation.run(cfg, log=lambda line: None)


def test_first_seed_bound_counts_the_seeds(monkeypatch, capsys):
    """--first-seed + --seeds - 1 must stay a 32-bit seed."""
    from gald.bench import ablation

    def must_not_run(*a, **k):
        raise AssertionError("the ablation ran")

    monkeypatch.setattr(ablation, "run", must_not_run)
    monkeypatch.setattr(ablation, "build_variants", must_not_run)
    with pytest.raises(SystemExit) as info:
        ablation.main(["--first-seed", str(2**32 - 1), "--seeds", "3", "--quiet"])
    assert info.value.code == 2
    assert "--first-seed must be in [0, 2**32 - --seeds]" in capsys.readouterr().err
