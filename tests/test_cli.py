"""The command line end to end on a small subset of the real data (../shared/data)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from advgen.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (DATA / "cifar-10-batches-py").is_dir(), reason="offline CIFAR-10 copy absent")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data
def test_train_generator_from_init_then_eval(tmp_path, capsys):
    base = tmp_path / "base"
    code, out, _ = run(["train", "--method", "standard", "--epochs", "1", "--train-subset", "256", "--test-subset", "64",
                        "--batch-size", "64", "--data-dir", DATA, "--device", "cpu", "--out", base], capsys)
    assert code == 0 and "test accuracy" in out
    rec = json.loads((base / "run.json").read_text())
    assert rec["config"]["method"] == "standard" and rec["train_images"] == 256
    (row,) = rec["epochs"]
    assert set(row) >= {"epoch", "seconds", "train_loss", "train_acc", "test_acc"} and row["seconds"] > 0

    gen = tmp_path / "gen"
    code, _, _ = run(["train", "--method", "generator", "--init", base, "--epochs", "1", "--train-subset", "256",
                      "--test-subset", "64", "--batch-size", "64", "--generators", "8", "--gen-bound-type", "l2",
                      "--gen-bound", "0.5", "--lr", "0.005", "--data-dir", DATA, "--device", "cpu", "--out", gen], capsys)
    assert code == 0
    assert (gen / "model.safetensors").exists() and (gen / "generators.safetensors").exists()
    cfg = json.loads((gen / "run.json").read_text())["config"]
    assert cfg["options"]["bank"]["n"] == 8 and cfg["init"] == str(base)

    out_json = tmp_path / "eval.json"
    code, out, _ = run(["eval", gen, "--data-dir", DATA, "--attack", "pgd-l2", "--eps", "0,0.5", "--steps", "3",
                        "--restarts", "2", "--pgd-objective", "margin,ce", "--test-subset", "32", "--out", out_json], capsys)
    assert code == 0 and "0.5" in out and "2 restart(s) ascending margin, ce" in out
    res = json.loads(out_json.read_text())
    p = res["protocol"]
    assert (p["attack"], p["norm"], p["steps"], p["objectives"], res["n"]) == ("pgd", "l2", 3, ["margin", "ce"], 32)
    assert list(res["pgd_l2"]) == ["0.0", "0.5"]
    assert res["pgd_l2"]["0.5"]["accuracy"] <= res["pgd_l2"]["0.0"]["accuracy"]
    assert {c["name"] for c in res["checks"]} >= {"accuracy non-increasing in eps", "attack at least as strong as FGSM"}


@pytest.mark.slow
@needs_data
def test_reproduce_smoke_writes_report_and_skips_done_stages(tmp_path, capsys):
    out = tmp_path / "repro"
    code, _, _ = run(["reproduce", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)
    assert code == 0
    for f in ("report.md", "figure2.png", "figure3.png", "results.json", "base/model.safetensors",
              "minmax/run.json", "generator/generators.safetensors"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert set(res["table1"]["rows"]) == {"base", "minmax", "generator"}
    assert res["table1"]["ratios"]["minmax/generator"] > 1  # 41 passes per batch against about 1
    report = (out / "report.md").read_text()
    assert "Table 1" in report and "JPEG-derived" in report
    stamp = (out / "minmax" / "model.safetensors").stat().st_mtime_ns
    # the finished stages' records name the machine and version that trained them: re-rendering keeps them
    base = out / "base" / "run.json"
    rec = json.loads(base.read_text())
    rec["epochs"][-1]["machine"], rec["version"] = "the machine that trained it, torch 1.0", "0.0.1"
    base.write_text(json.dumps(rec))
    code, _, _ = run(["reproduce", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)
    assert code == 0 and (out / "minmax" / "model.safetensors").stat().st_mtime_ns == stamp
    report = (out / "report.md").read_text()
    assert "advgen 0.0.1" in report and "the machine that trained it, torch 1.0" in report


@pytest.mark.slow
@needs_data
def test_reproduce_seeds_reports_mean_and_std_of_the_seeds(tmp_path, monkeypatch, capsys):
    import dataclasses
    from advgen.apps import reproduce as report
    monkeypatch.setitem(report.PRESETS, "smoke2", dataclasses.replace(   # a 2-step inner PGD: seconds
        report.PRESETS["smoke"], stage_options={"minmax": {"steps": 2, "step_size": 0.05}}, eval_steps=2))
    out = tmp_path / "repro"
    code, _, _ = run(["reproduce", "--preset", "smoke2", "--seeds", "0,1", "--data-dir", DATA, "--device", "cpu",
                      "--out", out], capsys)
    assert code == 0
    one = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert one[0]["settings"]["seed"] == 0 and one[1]["settings"]["seed"] == 1
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    base0, base1 = (o["curves"]["base"]["results"][0]["accuracy"] for o in one)
    point = res["curves"]["base"]["results"][0]
    assert point["accuracy"] == pytest.approx((base0 + base1) / 2)
    assert point["std"] == pytest.approx(abs(base0 - base1) / 2 ** 0.5)   # sample std of two values
    r = [o["table1"]["ratios"]["minmax/generator"] for o in one]
    assert res["table1"]["ratios"]["minmax/generator"]["mean"] == pytest.approx(sum(r) / 2)
    report = (out / "report.md").read_text()
    assert "2 seeds" in report and " ± " in report and (out / "figure3.png").exists()


@pytest.mark.parametrize("argv, needle", [
    (["reproduce", "--seeds", "1,1", "--out", "x"], "--seeds"),
    (["reproduce", "--seeds", "a,b", "--out", "x"], "--seeds"),
    (["train", "--method", "nope", "--out", "x"], "nope"),
    (["train", "--method", "standard", "--epochs", "0", "--out", "x"], "--epochs"),
    (["train", "--method", "minmax", "--attack-eps", "-1", "--out", "x"], "--attack-eps"),
    (["train", "--method", "minmax", "--attack-eps", "nan", "--out", "x"], "--attack-eps"),
    (["train", "--method", "generator", "--generators", "0", "--out", "x"], "--generators"),
    (["train", "--method", "generator", "--gen-bound", "0", "--out", "x"], "--gen-bound"),
    (["train", "--method", "standard", "--batch-size", "0", "--out", "x"], "--batch-size"),
    (["eval", "x", "--eps", "0,-1"], "--eps"),
    (["eval", "x", "--attack", "cw"], "cw"),
    (["reproduce", "--preset", "huge", "--out", "x"], "huge"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_missing_data_dir_and_bad_checkpoint_exit_2(tmp_path, capsys):
    code, _, err = run(["train", "--method", "standard", "--data-dir", tmp_path / "none", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "cifar-10-batches-py" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    code, _, err = run(["eval", bad, "--data-dir", tmp_path], capsys)
    assert code == 2 and str(bad) in err and "Traceback" not in err


def test_console_script_runs():
    exe = Path(sys.executable).parent / "advgen"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "advgen.cli"]
    res = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "advgen" in res.stdout


@pytest.mark.slow
@needs_data
def test_compare_smoke_writes_curves_with_seeds(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    code, _, _ = run(["compare", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)
    assert code == 0
    res = json.loads((out / "compare.json").read_text())
    rows = [(r["name"], r["seed"], r["budget_units"]) for r in res["rows"]]
    assert rows == [("base", 0, 0.0)] + [(n, s, u) for n in ("fgsm-rs-l2", "gen-sdi-l2") for s in (0, 1) for u in (1.0, 2.0)]
    for r in res["rows"][1:]:
        assert set(r["pgd"]) == {"0.25", "0.5"} and r["passes"] > 0 and r["budget_seconds"] > 0
        # AutoAttack on the final model of each run only; the gap rule wherever it ran
        assert (set(r["autoattack"]) == {"0.5"}) == (r["budget_units"] == 2.0)
        assert any(c["name"].startswith("PGD within") for c in r["checks"]) == (r["budget_units"] == 2.0)
    # a budget in work done: unit 4 passes, FGSM costs 2 per step, the generator with a step after it 3
    steps = {(r["name"], r["budget_units"]): r["steps"] for r in res["rows"][1:]}
    assert steps[("fgsm-rs-l2", 1.0)] == 2 and steps[("fgsm-rs-l2", 2.0)] == 4 and steps[("gen-sdi-l2", 2.0)] == 3
    assert (out / "curves.png").exists() and (out / "curves-seconds.png").exists()
    assert not list(out.rglob("*.aa-progress.json"))   # an AutoAttack's progress goes once its evaluation is stored
    md = (out / "compare.md").read_text()
    assert "| fgsm-rs-l2 | 1 |" in md and "mean ± std over seeds" in md
    rows = {ln.split(" | ")[0]: ln for ln in md.splitlines() if ln.startswith("| base |") or ln.startswith("| fgsm-rs-l2 | 1 |")}
    assert "±" not in rows["| base"] and "±" in rows["| fgsm-rs-l2"]      # one base model: no spread to show
    # the copy for docs/: re-rendered from compare.json under a name, the plot's name in its markdown
    docs = tmp_path / "docs"
    subprocess.run([sys.executable, str(ROOT / "tools" / "compare_docs.py"), str(out), "--name", "smoke",
                    "--out", str(docs)], check=True, capture_output=True)
    assert json.loads((docs / "compare-smoke.json").read_text()) == res
    assert "](curves-smoke.png)" in (docs / "compare-smoke.md").read_text()
    assert (docs / "curves-smoke.png").stat().st_size > 10_000 and (docs / "curves-smoke-seconds.png").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_docs.py"), str(tmp_path), "--name",
                          "x", "--out", str(docs)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "compare.json does not exist" in bad.stderr
    # run again: everything is found done (no training, cached evaluations)
    before = (out / "fgsm-rs-l2-s0" / "model.safetensors").stat().st_mtime_ns
    assert run(["compare", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)[0] == 0
    assert (out / "fgsm-rs-l2-s0" / "model.safetensors").stat().st_mtime_ns == before
    # a PGD setting changed: PGD runs again, AutoAttack's accuracies are reused (AutoAttack is not called)
    from advgen.apps.compare.plan import COMPARE_PRESETS

    def no_autoattack(*a, **k):
        raise AssertionError("AutoAttack ran again")
    monkeypatch.setattr("advgen.evaluation.protocol.AutoAttack", no_autoattack)
    monkeypatch.setattr(COMPARE_PRESETS["smoke"], "pgd_objectives", ["margin"])
    assert run(["compare", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)[0] == 0
    ev = json.loads((out / "gen-sdi-l2-s1" / "eval-step-3.json").read_text())
    assert ev["settings"]["pgd_objectives"] == ["margin"] and ev["checks"][-1]["name"].startswith("PGD within")
    assert [r["autoattack"] for r in json.loads((out / "compare.json").read_text())["rows"]] == \
        [r["autoattack"] for r in res["rows"]]
    monkeypatch.setattr(COMPARE_PRESETS["smoke"], "pgd_objectives", ["ce", "margin"])
    assert run(["compare", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)[0] == 0
    assert json.loads((out / "compare.json").read_text())["rows"] == res["rows"]      # PGD is deterministic
    # the records alone rebuild it (what tools/carry.py --light keeps): the runs' weights, snapshots
    # and states deleted, the same rows come back, nothing retrained
    for f in out.glob("*-s*/**/*.safetensors"):
        f.unlink()
    assert run(["compare", "--preset", "smoke", "--data-dir", DATA, "--device", "cpu", "--out", out], capsys)[0] == 0
    assert json.loads((out / "compare.json").read_text())["rows"] == res["rows"]
    assert not (out / "fgsm-rs-l2-s0" / "model.safetensors").exists()


def test_generator_presets_and_flag_overrides():
    from advgen.cli import build_parser
    from advgen.cli.train import train_config_from_args
    parse = lambda *a: train_config_from_args(build_parser().parse_args(["train", "--method", "generator", "--out", "x", *a]))
    paper = parse().options
    assert (paper.bank.n, paper.bank.bound, paper.bank.size, paper.optimizer, paper.lr) == (32, "box", 0.2, "sgd", 0.005)
    grad = parse("--gen-preset", "gradient").options
    assert grad.bank.grad_input and grad.bank.grad_skip and grad.bank.bound == "l2" and grad.optimizer == "adam"
    mixed = parse("--gen-preset", "gradient", "--gen-bound", "1.0", "--generators", "8", "--gen-lr", "0.01").options
    assert (mixed.bank.size, mixed.bank.n, mixed.lr, mixed.bank.grad_skip) == (1.0, 8, 0.01, True)


def test_the_plot_legend_counts_each_entrys_seeds():
    from advgen.apps.compare.report import _seeds
    assert _seeds([{"seeds": 3}, {"seeds": 3}]) == "3 seeds" and _seeds([{"seeds": 1}]) == "1 seed"
    assert _seeds([{"seeds": 1}, {"seeds": 3}]) == "1-3 seeds"


def test_gap_check_allows_exactly_three_points_and_flags_more():
    from advgen.evaluation import gap_check
    n = 200
    ev = lambda pgd, aa: ({"0.5": pgd / n}, {"0.5": aa / n})  # noqa: E731
    assert gap_check(*ev(62, 56), n)["passed"]          # 3.0 points: not "more than 3"
    assert not gap_check(*ev(63, 56), n)["passed"]      # 3.5 points


def test_config_file_sets_defaults_that_the_command_line_overrides(tmp_path, capsys):
    from advgen.cli import apply_config_file, build_parser
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "fgsm"\nattack-norm = "linf"\nattack_eps = "4/255"\nepochs = 3\nout = "runs/x"\n')
    parser = build_parser()
    argv = ["train", "--config", str(cfg), "--epochs", "5"]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert (args.method, args.attack_norm, args.epochs, args.out) == ("fgsm", "linf", 5, "runs/x")
    assert args.attack_eps == pytest.approx(4 / 255)
    cfg.write_text('epochs = 3\nwarp_speed = 9\n')
    assert main(["train", "--config", str(cfg), "--method", "standard", "--out", str(tmp_path / "r")]) == 2
    assert "unknown settings for advgen train: warp_speed" in capsys.readouterr().err
    cfg.write_text('epochs = [3\n')
    assert main(["train", "--config", str(cfg), "--method", "standard", "--out", str(tmp_path / "r")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_radii_as_fractions_and_help_shows_defaults(capsys):
    from advgen.cli import build_parser
    args = build_parser().parse_args(["train", "--method", "fgsm", "--attack-eps", "8/255", "--out", "x"])
    assert args.attack_eps == pytest.approx(8 / 255)
    args = build_parser().parse_args(["eval", "run", "--eps", "0,2/255,8/255"])
    assert args.eps == pytest.approx([0, 2 / 255, 8 / 255])
    assert main(["train", "--method", "fgsm", "--attack-eps", "8/0", "--out", "x"]) == 2
    assert "fraction such as 8/255" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 128)" in text and "else 0.1)" in text and "(default: cosine)" in text


def test_plot_draws_training_curves_of_runs(tmp_path, capsys):
    from synth_cifar import write_cifar
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    for name in ("a", "b"):
        assert main(["train", "--method", "fgsm", "--epochs", "2", "--batch-size", "16", "--watch-subset", "8",
                     "--seed", str(ord(name)), "--data-dir", str(data), "--device", "cpu",
                     "--out", str(tmp_path / name)]) == 0
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,accuracy,lr,seconds" and len(rows) == 1 + 2 * 5
    png = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(png), "--force"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_tensorboard_logs_the_steps_and_epochs(tmp_path):
    from synth_cifar import write_cifar
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    out = tmp_path / "run"
    assert main(["train", "--method", "standard", "--epochs", "2", "--batch-size", "16", "--tensorboard",
                 "--data-dir", str(data), "--device", "cpu", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 11))
    csv_loss = [float(r.split(",")[2]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [e.value for e in loss] == pytest.approx(csv_loss, rel=1e-5)
    assert [e.step for e in events.Scalars("eval/test_acc")] == [5, 10]


# a non-default value for every TrainConfig field, as a flag gives it and as the config then holds it
FIELD_FLAGS = {
    "model": (["--model", "resnet32"], "resnet32"), "dataset": (["--dataset", "cifar100"], "cifar100"),
    "epochs": (["--epochs", "3"], 3), "batch_size": (["--batch-size", "64"], 64), "lr": (["--lr", "0.02"], 0.02),
    "momentum": (["--momentum", "0.8"], 0.8), "weight_decay": (["--weight-decay", "1e-4"], 1e-4),
    "schedule": (["--schedule", "constant"], "constant"), "seed": (["--seed", "7"], 7),
    "train_subset": (["--train-subset", "500"], 500), "test_subset": (["--test-subset", "50"], 50),
    "watch_subset": (["--watch-subset", "20"], 20), "watch_norm": (["--watch-subset", "20", "--watch-norm", "linf"], "linf"),
    "watch_eps": (["--watch-subset", "20", "--watch-eps", "4/255"], 4 / 255), "watch_steps": (["--watch-steps", "5"], 5),
    "init": (["--init", "zoo:resnet20-base"], "zoo:resnet20-base"),
    "init_normalize": (["--init", "x.pt", "--normalize", "none"], "none"), "augment": (["--augment", "flip"], "flip"),
    "time_budget": (["--time-budget", "60"], 60.0), "budget_clock": (["--time-budget", "60", "--budget-clock", "process"], "process"),
    "budget_steps": (["--budget-steps", "9"], 9), "channels_last": (["--channels-last", "false"], False),
    "compile": (["--compile"], True), "precision": (["--precision", "fp32"], "fp32"),
    "fold_bn_attack": (["--fold-bn-attack", "false"], False), "sync_bn": (["--sync-bn"], True),
    "method": (["--method", "nfgsm"], "nfgsm"),
}


def test_every_train_config_field_has_its_flag():
    """Every TrainConfig field is set by a flag of advgen train (options by the methods' own, tested in
    test_extending.py): a field added without one fails here, so the CLI and the API never drift apart."""
    import dataclasses
    from advgen.cli import build_parser
    from advgen.cli.train import train_config_from_args
    from advgen.training import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    assert fields == set(FIELD_FLAGS), f"fields without a flag here: {sorted(fields - set(FIELD_FLAGS))}"
    for name, (argv, value) in FIELD_FLAGS.items():
        base = [] if name == "method" else ["--method", "standard"]
        cfg = train_config_from_args(build_parser().parse_args(["train", *base, *argv, "--out", "x"]))
        assert getattr(cfg, name) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, name) == value, name


@needs_data
def test_eval_takes_the_norm_the_model_was_trained_against_and_says_so(tmp_path, capsys, caplog):
    """A Linf-trained model is evaluated at Linf unless --norm says otherwise; a model trained without a
    threat model (the base) at the L2 default; the record says which rule chose."""
    import logging
    caplog.set_level(logging.INFO, logger="advgen")
    flags = ["--data-dir", DATA, "--test-subset", "8", "--steps", "1", "--device", "cpu"]
    cases = [("zoo:resnet20-nfgsm-linf", [], "linf", "the model's training (linf 8/255)"),
             ("zoo:resnet20-nfgsm-linf", ["--norm", "l2"], "l2", "--norm"),
             ("zoo:resnet20-base", [], "l2", "the default (l2)")]
    for i, (model, extra, norm, source) in enumerate(cases):
        out = tmp_path / f"e{i}.json"
        code, stdout, _ = run(["eval", model, *flags, *extra, "--out", out], capsys)
        rec = json.loads(out.read_text())
        assert code == 0 and rec["norm_from"] == source and rec["protocol"]["norm"] == norm
        assert f"PGD-{norm.upper()}" in stdout
    assert "norm linf: the threat model zoo:resnet20-nfgsm-linf was trained against (linf 8/255)" in caplog.text
