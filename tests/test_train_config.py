"""Training configuration: defaults, YAML bases, command-line overrides, and the errors that name the key."""

import os
import typing
import warnings
from pathlib import Path

import pytest
import yaml
from torch.utils.data import DataLoader

from gamma.config import GammaConfig
from gamma.data import DatasetEntry
from gamma.train.config import ConfigError, TrainConfig, config_to_dict, load_config, save_config
from gamma.train.stages import STAGES

OPTIONS = Path(__file__).resolve().parents[1] / "options"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_papers_recipe():
    cfg = load_config()
    assert (cfg.epochs, cfg.batch_size, cfg.seed, cfg.sampler) == (10, 8, 123, "uniform")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.scheduler, cfg.optim.min_lr) == (2e-5, 0.0, "cosine", 0.0)
    assert cfg.eval.select_metric == "srcc" and (cfg.eval.crop_mode, cfg.eval.crops) == ("random", 10)


def test_overrides_dotted_keys_lists_and_yaml_values():
    cfg = load_config(None, ["optim.lr=1e-4", "epochs=3", "data=[koniq10k, {name: live}]", "data.0.root=/x",
                             "amp=bf16", "eval.datasets=[live]", "model.overrides.num_experts=5",
                             "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-4" as a string
    assert cfg.epochs == 3 and cfg.amp == "bf16" and cfg.optim.betas == (0.8, 0.9)
    assert [e.name for e in cfg.data] == ["koniq10k", "live"]
    assert cfg.data[0].root == "/x" and cfg.data[1].root == "databaserelease2"  # registry default kept
    assert cfg.model.overrides == {"num_experts": 5}


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "did you mean 'lr'"]),
        ("epoch=2", ["'epoch'", "did you mean 'epochs'"]),
        ("data=[{name: live, metafile: m.csv}]", ["data.0.metafile", "meta_file"]),
        ("model.overrides.num_expert=2", ["model.overrides.num_expert", "num_experts"]),
        ("model.overrides.vision.widht=2", ["model.overrides.vision.widht", "width"]),
        ("model.name=gamma_tst", ["model.name", "gamma_test"]),
        ("eval.crop_mode=rand", ["eval.crop_mode", "random"]),
        ("data.0.root=/x", ["data.0.root", "no item 0"]),
        ("noequals", ["key=value"]),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize(
    "override, words",
    [
        ("epochs=abc", ["epochs", "expected int", "'abc'"]),
        ("epochs=1.5", ["epochs", "expected int"]),
        ("seed=true", ["seed", "expected int", "bool"]),
        ("optim.lr=fast", ["optim.lr", "expected float"]),
        ("log.progress=3", ["log.progress", "expected bool"]),
        ("amp=bf61", ["amp", "one of", "'bf16'"]),
        ("optim.betas=[1]", ["optim.betas", "2 values"]),
        ("data={name: live}", ["data", "expected a list"]),
        ("eval.keep_only_experts=[a]", ["eval.keep_only_experts.0", "expected int"]),
        ("epochs=0", ["epochs", ">= 1"]),
        ("batch_size=8", None),  # valid: control case
        ("grad_accum=3", ["batch_size", "divisible", "grad_accum"]),
        ("data=[{name: live, split_index: 2}]", ["data.0.split_index", "--split_index"]),
        ("data=[live, live]", ["more than one entry named 'live'"]),
    ],
)
def test_wrong_types_and_values_name_key_and_expectation(override, words):
    if words is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value), str(err.value)


def test_base_inheritance_chain_relative_paths_and_merge(tmp_path):
    write(tmp_path / "a" / "root.yml", "name: root\nepochs: 4\noptim: {lr: 1.0e-3, weight_decay: 0.1}\n"
                                         "data: [live, csiq]\n")
    write(tmp_path / "a" / "mid.yml", "base: root.yml\noptim: {lr: 5.0e-4}\n")
    leaf = write(tmp_path / "b" / "leaf.yml", "base: ../a/mid.yml\nname: leaf\ndata: [koniq10k]\n")
    cfg = load_config(leaf, ["epochs=6"])
    assert cfg.name == "leaf" and cfg.epochs == 6
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.1  # mappings merge key by key
    assert [e.name for e in cfg.data] == ["koniq10k"]  # lists are replaced whole


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="option file not found.*missing.yml"):
        load_config(tmp_path / "missing.yml")
    bad = write(tmp_path / "bad.yml", "epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yml: malformed YAML"):
        load_config(bad)
    child = write(tmp_path / "child.yml", "base: nothere.yml\n")
    with pytest.raises(ConfigError, match=r"nothere.yml \(base of .*child.yml\)"):
        load_config(child)
    write(tmp_path / "x.yml", "base: y.yml\n")
    loop = write(tmp_path / "y.yml", "base: x.yml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(loop)
    scalar = write(tmp_path / "scalar.yml", "just a string\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)


def test_environment_variables(tmp_path, monkeypatch):
    opt = write(tmp_path / "o.yml", "data_root: ${GAMMA_TEST_ROOT}\nname: ${GAMMA_TEST_NAME:-fallback}\n"
                                    "data: [live]\n")
    monkeypatch.delenv("GAMMA_TEST_ROOT", raising=False)
    monkeypatch.delenv("GAMMA_TEST_NAME", raising=False)
    with pytest.raises(ConfigError, match="data_root: environment variable GAMMA_TEST_ROOT is not set"):
        load_config(opt)
    cfg = load_config(opt, ["data_root=/d"])  # an override replaces the variable
    assert cfg.data_root == "/d" and cfg.name == "fallback" and cfg.data[0].data_root == "/d"
    monkeypatch.setenv("GAMMA_TEST_ROOT", "/env/root")
    assert load_config(opt).data[0].data_root == "/env/root"


def test_run_split_index_reaches_every_entry():
    cfg = load_config(None, ["data=[live, {name: csiq, split_index: all}]", "split_index=7"])
    assert cfg.data[0].split_index == 7 and cfg.data[1].split_index == "all"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["data=[koniq10k]", "optim.lr=3e-5", "eval.keep_only_experts=[1]", "name=rt"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(yaml.safe_load((tmp_path / "config.yaml").read_text()), dict)


def test_shipped_options_all_load_without_absolute_paths(monkeypatch):
    monkeypatch.setenv("GAMMA_DATA_ROOT", "/datasets")
    monkeypatch.setenv("PROMPTIQA_WEIGHTS", "experiments/promptiqa_paper_12/split_1/best.pth")  # Table 3/4 evaluations
    files = sorted(p for p in OPTIONS.rglob("*.yml") if not p.name.startswith("demo"))
    assert len(files) >= 40
    for f in files:
        text = f.read_text(encoding="utf-8")
        for line in text.splitlines():
            value = line.split(":", 1)[-1].strip()
            assert not value.startswith("/"), f"{f}: absolute path in {line!r}"
        cfg = load_config(f)
        # (ATTIQA pretraining may read unlabelled folders instead; a shared base file has no data of its own, or only
        # evaluation sets)
        assert isinstance(cfg, TrainConfig), f
        assert cfg.data or cfg.attiqa.folders or cfg.eval_data or f.stem.endswith("base"), f
    unified = load_config(OPTIONS / "unified.yml")
    assert len(unified.data) == 12 and unified.data_root == "/datasets" and unified.model.pretrained == "uniqa"
    assert load_config(OPTIONS / "unified_sdp.yml").model.overrides == {"prompt_set": "sdp"}
    table8 = {"live": (50, 8), "tid2013": (20, 8), "gfiqa20k": (10, 8), "ava": (20, 128), "uwiqa": (50, 8)}
    for name, (epochs, batch) in table8.items():
        cfg = load_config(OPTIONS / "task" / f"{name}.yml")
        assert (cfg.epochs, cfg.batch_size, [e.name for e in cfg.data]) == (epochs, batch, [name])
    assert len(list((OPTIONS / "task").glob("*.yml"))) == 14
    assert load_config(OPTIONS / "ablation" / "single_expert_2.yml").eval.keep_only_experts == [2]


def test_default_workers_fit_the_machine_and_an_explicit_value_is_kept():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = load_config()
    assert cfg.workers == min(4, cpus) and cfg.eval.workers is None  # evaluation uses the training value
    with warnings.catch_warnings():  # PyTorch warns when a DataLoader asks for more workers than CPUs
        warnings.simplefilter("error")
        DataLoader(range(4), num_workers=cfg.workers)
    assert load_config(None, ["workers=7"]).workers == 7


def test_every_stage_the_config_accepts_is_registered():
    accepted = set(typing.get_args(typing.get_type_hints(TrainConfig)["stage"]))
    assert accepted == set(STAGES) and "pretrain_clip" in accepted
    with pytest.raises(ConfigError, match=r"stage: expected one of 'gamma', 'pretrain_clip'.*did you mean 'gamma'"):
        load_config(None, ["stage=gama"])


def test_one_loader_names_unknown_keys_of_model_dataset_and_training_configs():
    with pytest.raises(ValueError, match=r"unknown model config key 'vision\.widht' \(did you mean 'width'\?\)"):
        GammaConfig.from_dict({"vision": {"widht": 64}})
    with pytest.raises(ValueError, match=r"dataset 'live': unknown dataset key 'metafile' \(did you mean 'meta_file'"):
        DatasetEntry.from_dict({"name": "live", "metafile": "m.csv"})
    with pytest.raises(ConfigError, match=r"unknown key 'data\.0\.metafile' \(did you mean 'meta_file'\?\); known keys "
                                          r"of data\.0: name, root, meta_file"):
        load_config(None, ["data=[{name: live, metafile: m.csv}]"])
    # the dict forms round-trip
    cfg = GammaConfig(vision={"width": 64, "heads": 1})
    assert GammaConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["levels"] == list(cfg.levels)
    entry = DatasetEntry.from_dict({"name": "koniq10k", "split_index": 2})
    assert DatasetEntry.from_dict(entry.to_dict()) == entry and isinstance(entry.to_dict()["mos_range"], list)


def test_only_the_command_line_may_ask_to_replace_an_unfinished_run(tmp_path):
    # demo_base.yml's overwrite: true is inherited by every demo file; it must not count as the user's request
    write(tmp_path / "base.yml", "overwrite: true\n")
    child = write(tmp_path / "child.yml", "base: base.yml\nname: child\n")
    inherited = load_config(child)
    assert inherited.overwrite and not inherited.restart
    assert load_config(child, ["overwrite=true"]).restart
    assert not load_config(child, ["overwrite=false"]).restart and not load_config(child, ["epochs=2"]).restart
    assert "restart" not in config_to_dict(load_config(child, ["overwrite=true"]))  # never written to config.yaml
    with pytest.raises(ConfigError, match="unknown key 'restart'"):  # and no option file can set it
        load_config(write(tmp_path / "sneaky.yml", "restart: true\n"))
    # a chain's next stage inherits the first stage's request, not the overwrite its option file passes on
    from gamma.train.stages import follow_up_config

    stage = write(tmp_path / "next.yml", "name: next\nepochs: 1\n")
    assert not follow_up_config(str(stage), inherited, tmp_path / "w.pth").restart
    assert follow_up_config(str(stage), load_config(child, ["overwrite=true"]), tmp_path / "w.pth").restart
