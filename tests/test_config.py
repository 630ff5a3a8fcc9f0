"""Tests for collafuse_mpi.config: defaults, validation messages, TOML loading, overrides, k."""
import pytest

from collafuse_mpi import config as C
from collafuse_mpi.config import Config, ConfigError, cut_to_k, from_dict, load, set_value, validate


@pytest.fixture
def cfg(tmp_path):
    c = Config()
    c.run.output = str(tmp_path / "results.h5")
    return c


def fails(cfg, match, world_size=3):
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size)


# ------------------------------------------------------------------ defaults

def test_defaults_validate(cfg):
    validate(cfg, 3)
    validate(cfg, 2)
    validate(cfg)          # world size unknown: its checks are skipped
    assert cfg.cut_steps(2) == [40, 40]      # cut 0.4 of T = 100


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_to_json_round_trips_through_from_dict(cfg):
    import json
    cfg.diffusion.cut = 0.25
    cfg.diffusion.client_cuts = [0.1, 0.9]
    again = from_dict(json.loads(cfg.to_json()))
    assert again == cfg


# ------------------------------------------------------------------ the cut

@pytest.mark.parametrize("raw", ["1.5", "-0.1", "nan", "inf"])
def test_cut_out_of_range_fails_naming_cut(cfg, raw):
    set_value(cfg, "diffusion.cut", raw)
    assert isinstance(cfg.diffusion.cut, float)
    fails(cfg, r"cut must be a number in \[0, 1\]")


def test_cut_not_a_number_fails_in_set_value(cfg):
    with pytest.raises(ConfigError, match=r"diffusion\.cut: 'abc' is not a valid float"):
        set_value(cfg, "diffusion.cut", "abc")
    assert cfg.diffusion.cut == 0.4          # unchanged


@pytest.mark.parametrize("value", ["0.4", True, None, [0.4]])
def test_cut_of_wrong_type_from_toml_fails(cfg, value):
    cfg.diffusion.cut = value
    fails(cfg, "cut must be a number")


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5])
def test_cut_bounds_are_inclusive(cfg, value):
    cfg.diffusion.cut = value
    validate(cfg, 3)


def test_client_cuts_count_must_match_clients(cfg):
    cfg.diffusion.client_cuts = [0.2, 0.5, 0.7]
    fails(cfg, r"3 client cuts given for 2 clients", world_size=3)
    validate(cfg, 4)
    assert cfg.cut_steps(3) == [20, 50, 70]


def test_client_cut_out_of_range_fails(cfg):
    cfg.diffusion.client_cuts = [0.2, 1.2]
    fails(cfg, r"client cut must be a number in \[0, 1\], got 1.2")


def test_client_cuts_scalar_from_toml_fails_clearly(cfg):
    cfg.diffusion.client_cuts = 0.5
    fails(cfg, "client_cuts|client cut")


@pytest.mark.parametrize("ws", [1, 0])
def test_world_size_below_two_fails(cfg, ws):
    fails(cfg, "at least 2 ranks", world_size=ws)


# ------------------------------------------------------------------ data

def test_unknown_dataset(cfg):
    cfg.data.dataset = "mnist"
    fails(cfg, "unknown dataset 'mnist'")


def test_npz_without_path(cfg):
    cfg.data.dataset = "npz"
    fails(cfg, r"dataset npz needs data\.path")


def test_npz_path_missing(cfg, tmp_path):
    cfg.data.dataset = "npz"
    cfg.data.path = str(tmp_path / "nope.npz")
    fails(cfg, r"data path .*nope\.npz does not exist")


def test_npz_path_is_a_folder(cfg, tmp_path):
    cfg.data.dataset = "npz"
    cfg.data.path = str(tmp_path)
    fails(cfg, "is not a file")


def test_npz_path_present_validates(cfg, tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"x")
    cfg.data.dataset = "npz"
    cfg.data.path = str(p)
    validate(cfg, 3)


def test_folder_dataset_needs_a_folder(cfg, tmp_path):
    p = tmp_path / "f.png"
    p.write_bytes(b"x")
    cfg.data.dataset = "folder"
    cfg.data.path = str(p)
    fails(cfg, "is not a folder")
    cfg.data.path = str(tmp_path)
    validate(cfg, 3)


@pytest.mark.parametrize("preset,size,ok", [("small", 10, False), ("small", 12, True),
                                            ("tiny", 9, False), ("tiny", 8, True),
                                            ("base", 20, False), ("base", 24, True),
                                            ("tiny", 2, False)])
def test_image_size_must_fit_preset(cfg, preset, size, ok):
    cfg.model.preset = preset
    cfg.data.image_size = size
    if ok:
        validate(cfg, 3)
    else:
        fails(cfg, f"image size {size} does not fit model preset {preset}")


def test_unknown_preset(cfg):
    cfg.model.preset = "huge"
    fails(cfg, r"model\.preset 'huge' unknown")


def test_channels(cfg):
    cfg.data.channels = 2
    fails(cfg, r"data\.channels must be 1 or 3")


@pytest.mark.parametrize("section,key,value,match", [
    ("diffusion", "timesteps", 1, r"diffusion\.timesteps"),
    ("diffusion", "schedule", "quadratic", r"diffusion\.schedule"),
    ("diffusion", "sampler", "euler", r"diffusion\.sampler"),
    ("diffusion", "sample_steps", 101, r"diffusion\.sample_steps"),
    ("diffusion", "sample_steps", 1, r"diffusion\.sample_steps"),
    ("train", "lr", 0.0, r"train\.lr"),
    ("train", "ema_decay", 1.0, r"train\.ema_decay"),
    ("train", "batch_size", 0, r"train\.batch_size"),
    ("data", "holdout", 1.0, r"data\.holdout"),
    ("data", "partition", "zipf", r"data\.partition"),
    ("run", "device", "tpu", r"run\.device"),
    ("run", "if_exists", "ignore", r"run\.if_exists"),
    ("train", "autocast", "fp8", r"train\.autocast must be off or bf16"),
    ("train", "channels_last", "yes", r"train\.channels_last"),
])
def test_other_invalid_values_name_their_field(cfg, section, key, value, match):
    setattr(getattr(cfg, section), key, value)
    fails(cfg, match)


def test_bool_for_integer_field_is_rejected(cfg):
    cfg.train.steps = True
    fails(cfg, r"train\.steps")


# ------------------------------------------------------------------ output

def test_existing_output_needs_append_or_overwrite(cfg):
    open(cfg.run.output, "w").close()
    fails(cfg, r"exists; pass --append .* or --overwrite")
    for mode in ("append", "overwrite"):
        cfg.run.if_exists = mode
        validate(cfg, 3)


def test_output_that_is_a_folder(cfg, tmp_path):
    cfg.run.output = str(tmp_path)
    fails(cfg, "is a folder, not a file")
    cfg.run.if_exists = "overwrite"          # not even with overwrite
    fails(cfg, "is a folder, not a file")


def test_output_in_missing_folder(cfg, tmp_path):
    cfg.run.output = str(tmp_path / "no" / "such" / "r.h5")
    fails(cfg, "output folder .* is not writable")


# ------------------------------------------------------------------ TOML

def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_toml_loads_values(tmp_path):
    cfg = load(write(tmp_path, '[diffusion]\ncut = 0.25\ntimesteps = 40\nclient_cuts = [0.1, 0.5]\n'
                                '[train]\nsteps = 7\n[run]\nquiet = true\n'))
    assert cfg.diffusion.cut == 0.25 and cfg.diffusion.timesteps == 40
    assert cfg.diffusion.client_cuts == [0.1, 0.5] and cfg.train.steps == 7 and cfg.run.quiet is True
    assert cfg.model == Config().model       # untouched sections keep defaults
    assert cfg.cut_steps(2) == [4, 20]


def test_toml_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key diffusion\.cutt"):
        load(write(tmp_path, "[diffusion]\ncutt = 0.3\n"))


def test_toml_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config section \[optim\]"):
        load(write(tmp_path, "[optim]\nlr = 0.1\n"))


def test_toml_top_level_scalar_is_not_a_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        load(write(tmp_path, "cut = 0.3\n"))
    with pytest.raises(ConfigError, match=r"\[diffusion\] must be a table"):
        from_dict({"diffusion": 0.3})


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[diffusion\ncut = \n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(str(tmp_path / "missing.toml"))


def test_load_without_path_gives_defaults():
    assert load(None) == Config() and load("") == Config()


# ------------------------------------------------------------------ set_value

@pytest.mark.parametrize("dotted,raw,expected", [
    ("train.steps", "10", 10),
    ("diffusion.timesteps", "1000", 1000),
    ("train.lr", "1e-3", 1e-3),
    ("diffusion.cut", "1", 1.0),
    ("diffusion.cut", "0", 0.0),
    ("run.quiet", "true", True),
    ("run.quiet", "Yes", True),
    ("run.quiet", "on", True),
    ("run.quiet", "1", True),
    ("run.quiet", "false", False),
    ("run.quiet", "off", False),
    ("run.quiet", "0", False),
    ("diffusion.client_cuts", "0.1,0.5", [0.1, 0.5]),
    ("diffusion.client_cuts", "0.25, 1,", [0.25, 1.0]),
    ("diffusion.client_cuts", "", []),
    ("data.dataset", "shapes", "shapes"),
    ("run.output", "x/y.h5", "x/y.h5"),
    ("train.steps", 5, 5),                  # non-strings pass through
])
def test_set_value_coerces(dotted, raw, expected):
    cfg = Config()
    set_value(cfg, dotted, raw)
    section, key = dotted.split(".")
    got = getattr(getattr(cfg, section), key)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("dotted,raw,match", [
    ("train.steps", "ten", r"train\.steps: 'ten' is not a valid int"),
    ("train.steps", "1.5", r"train\.steps: '1\.5' is not a valid int"),
    ("run.quiet", "maybe", r"run\.quiet: 'maybe' is not a valid bool"),
    ("diffusion.client_cuts", "0.1,x", r"diffusion\.client_cuts: .* is not a valid list"),
    ("train.stepz", "1", r"unknown config key train\.stepz"),
    ("trainer.steps", "1", r"unknown config section 'trainer'"),
    ("steps", "1", "must look like section.key"),
])
def test_set_value_rejects(dotted, raw, match):
    with pytest.raises(ConfigError, match=match):
        set_value(Config(), dotted, raw)


# ------------------------------------------------------------------ cut_to_k

@pytest.mark.parametrize("T", [2, 3, 7, 10, 20, 100, 1000])
def test_cut_to_k_exact_at_grid_points_and_nearest(T):
    for i in range(T + 1):
        assert cut_to_k(i / T, T) == i                 # float error never shifts k
    for c in [j / 997 for j in range(998)]:
        k = cut_to_k(c, T)
        assert isinstance(k, int) and 0 <= k <= T
        assert abs(k - c * T) <= 0.5 + 1e-9            # the nearest integer to c*T
    assert cut_to_k(0.0, T) == 0 and cut_to_k(1.0, T) == T


@pytest.mark.parametrize("c,T,k", [(0.4, 100, 40), (0.35, 100, 35), (0.29, 100, 29),
                                   (0.333, 10, 3), (0.36, 10, 4), (0.01, 20, 0), (0.03, 20, 1),
                                   (0.999, 100, 100), ("0.5", 10, 5)])
def test_cut_to_k_examples(c, T, k):
    assert cut_to_k(c, T) == k


def test_describe_lists_every_field():
    text = C.describe()
    for sec in ("model", "diffusion", "data", "train", "sample", "run"):
        assert f"[{sec}]" in text
    assert "cut = 0.4" in text and "k = round(c*T)" in text


# ------------------------------------------------------------------ types, and every problem at once

def _wrong_value(default):
    """A value of another type than the field's: what a TOML file may carry by mistake."""
    if isinstance(default, bool):
        return "false"   # a string is not a boolean, whatever it says
    if isinstance(default, (int, float)):
        return str(default)
    if isinstance(default, str):
        return 5
    return "0.1,0.2"     # a list field given a string


EVERY_FIELD = [(s.name, f.name) for s in C.fields(Config) for f in C.fields(getattr(Config(), s.name))]


@pytest.mark.parametrize("section,key", EVERY_FIELD)
def test_every_field_refuses_a_value_of_another_type_by_name_and_type(cfg, section, key):
    """Driven by the dataclasses, so a new section or field is covered without a new test."""
    sub = getattr(cfg, section)
    wrong = _wrong_value(getattr(sub, key))
    setattr(sub, key, wrong)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 3)
    text = str(err.value)
    assert f"{section}.{key} must be " in text, text
    assert ("the string" if isinstance(wrong, str) else "the integer") in text, text


def test_toml_string_for_a_boolean_is_refused_not_taken_as_true(tmp_path):
    cfg = load(write(tmp_path, '[run]\nstore_real = "false"\n'))
    cfg.run.output = str(tmp_path / "r.h5")
    with pytest.raises(ConfigError, match=r"run\.store_real must be true or false, got the string 'false'"):
        validate(cfg, 3)


def test_string_for_an_integer_says_integer_not_range(cfg):
    cfg.train.steps = "100"
    with pytest.raises(ConfigError) as err:
        validate(cfg, 3)
    assert "train.steps must be an integer, got the string '100'" in str(err.value)
    assert ">= 1" not in str(err.value)


def test_an_integer_is_a_valid_float(cfg):
    cfg.train.lr, cfg.diffusion.cut = 1, 1
    validate(cfg, 3)


def test_every_problem_is_reported_at_once(cfg):
    cfg.train.steps = "100"
    cfg.diffusion.cut = 2.0
    cfg.model.preset = "huge"
    cfg.run.store_real = "yes"
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    e = err.value
    assert len(e.problems) == 5, e.problems
    text = str(e)
    assert text.startswith("5 problems in the config:")
    for part in ("train.steps must be an integer", "cut must be a number in [0, 1]", "model.preset 'huge'",
                 "run.store_real must be true or false", "at least 2 ranks"):
        assert part in text, text


def test_one_problem_reads_as_one_line(cfg):
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError) as err:
        validate(cfg, 3)
    assert str(err.value) == "train.batch_size must be >= 1" and err.value.problems == [str(err.value)]


def test_npz_without_path_is_one_problem(cfg):
    cfg.data.dataset = "npz"
    with pytest.raises(ConfigError) as err:
        validate(cfg, 3)
    assert err.value.problems == ["dataset npz needs data.path"]


def test_set_value_coerces_by_the_declared_type_even_after_a_bad_value(cfg):
    cfg.train.steps = "junk"  # e.g. from TOML; --set then replaces it with a real integer
    set_value(cfg, "train.steps", "12")
    assert cfg.train.steps == 12


# ------------------------------------------------------------------ outputs, checked before training

def test_negative_seed_is_refused(cfg):
    cfg.run.seed = -1
    fails(cfg, r"run\.seed must be an integer in \[0, 2\*\*63\)")


def test_run_name_with_a_slash_is_refused(cfg):
    cfg.run.run_name = "a/b"
    fails(cfg, r"run\.run_name 'a/b' must not contain '/'")


def test_output_that_is_the_data_file_is_refused_even_with_overwrite(cfg, tmp_path):
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    cfg.data.dataset, cfg.data.path = "npz", str(data)
    cfg.run.output, cfg.run.if_exists = str(tmp_path / "." / "d.npz"), "overwrite"
    fails(cfg, "is the data file the run reads")


@pytest.mark.parametrize("field", ["save_dir", "checkpoint_dir"])
def test_unwritable_output_folders_are_refused_before_training(cfg, tmp_path, field):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    setattr(cfg.run, field, str(blocker / "models"))
    fails(cfg, rf"run\.{field} .* cannot be written: .*plain-file is a file, not a folder")


def test_read_only_output_folder_is_refused(cfg, tmp_path):
    """A real write is tried (root passes every permission check): a read-only mount fails it."""
    import subprocess
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        cfg.run.save_dir = str(ro / "models")
        fails(cfg, r"run\.save_dir .* cannot be written: .* is not writable \(Read-only file system\)")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_missing_save_dir_in_a_writable_folder_is_fine(cfg, tmp_path):
    cfg.run.save_dir = str(tmp_path / "new" / "models")
    validate(cfg, 3)
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_toml_unknown_keys_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "[diffusion]\ncutt = 0.3\n[train]\nstepz = 3\n[optim]\nlr = 1\n"))
    assert len(err.value.problems) == 3 and "diffusion.cutt" in str(err.value) and "train.stepz" in str(err.value)
