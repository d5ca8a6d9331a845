"""Config layering and every error of the foundation issue, as the user sees them."""
import subprocess
import sys

import pytest

from tests.conftest import REPO
from utils.attack import attack_config
from utils.errors import UserError

import attack.badnet as badnet


def cfg_of(argv):
    return attack_config("badnet", badnet.OPTIONS, argv)[0]


def test_layering_prototype_default_yaml_cli(tmp_path):
    c = cfg_of([])
    assert c["dataset"] == "fashion_mnist" and c["model"] == "cnn"        # prototype/fashion_mnist.yaml
    assert c["patch_size"] == 3 and c["pratio"] == 0.1                      # badnet/default.yaml
    y = tmp_path / "my.yaml"
    y.write_text("pratio: 0.05\nepochs: 3\nlr: 0.2\n")
    c = cfg_of(["--yaml_path", str(y), "--epochs", "2"])
    assert c["pratio"] == 0.05 and c["lr"] == 0.2 and c["epochs"] == 2      # command line beats the yaml
    c = cfg_of(["--dataset", "cifar10"])
    assert c["model"] == "preactresnet18" and c["epochs"] == 100 and c["batch_size"] == 128 and c["cos_t_max"] == 100
    assert c["wd"] == 5e-4 and c["lr"] == 0.01


@pytest.mark.parametrize("argv, message", [
    (["--pratio", "1.5"], r"pratio = 1.5 .* out of range; allowed: \(0, 1\]"),
    (["--pratio", "0"], r"pratio = 0.0 .* out of range"),
    (["--pratio", "abc"], r"pratio = 'abc'"),
    (["--attack_target", "10"], r"attack_target = 10 .*fashion_mnist has 10 classes, allowed: 0..9"),
    (["--dataset", "imagenet"], r"unknown dataset 'imagenet'; known datasets: fashion_mnist"),
    (["--model", "resnet1000"], r"model = 'resnet1000' .* choose one of: cnn, preactresnet18"),
    (["--epochs", "2.5"], r"epochs = '2.5' .* expected an integer"),
    (["--amp", "maybe"], r"amp = 'maybe' .* expected auto, true or false"),
    (["--attack_label_trans", "all2all", "--attack_label_shift_amount", "10"], r"maps every label to itself"),
    (["--patch_position", "middle"], r"patch_position 'middle' unknown"),
])
def test_bad_values_name_the_key_and_what_is_allowed(argv, message):
    with pytest.raises(UserError, match=message):
        c = cfg_of(argv)
        badnet.make_patch_trigger(c)


def test_unknown_yaml_key_names_the_key_and_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("pratoi: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'pratoi' in .*bad.yaml; did you mean: pratio"):
        cfg_of(["--yaml_path", str(y)])
    y.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        cfg_of(["--yaml_path", str(y)])
    with pytest.raises(UserError, match="not found"):
        cfg_of(["--yaml_path", str(tmp_path / "missing.yaml")])


def test_the_script_prints_one_line_and_no_traceback():
    r = subprocess.run([sys.executable, "attack/badnet.py", "--pratio", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: pratio = 2.0")
    r = subprocess.run([sys.executable, "defense/../attack/blend.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--attack_train_blended_alpha" in r.stdout
