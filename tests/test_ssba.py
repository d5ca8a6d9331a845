"""SSBA (docs/specs/ssba.md §9) on tiny sizes: the BCH string against bchlib 2.1.3's vectors, the networks' shapes and
parameter counts, padding, the canonical float64 encoding (chunks, threads, the quantiser, table = recomputation),
the L2 schedule, the encoder resource (reproducible from its seed, reused, refused when foreign, a failed build
moved aside), a record that rebuilds without its resource folder, and BackdoorBench's .npy import."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from attack import ssba
from utils.data import load_dataset
from utils.errors import UserError
from utils.poison import PoisonPlan, build_poisoned_data
from utils.record import load_attack_record
from utils.stegastamp import (bch_ecc, bch_generator, canonical_encode, code_bits, crop, encode, fingerprint,
                              float64_encoder, l2_weight, make_networks, next_counter, pad, quantize, secret_bytes,
                              secret_recovered)

B_STAR_A = ("0110000100100000001000000010000000100000001000000010000010000110100100111110000101000111111000000000")
TINY = ["--ssba_width", "2", "--ssba_decoder_width", "2", "--ssba_fingerprint_length", "50", "--ssba_num_steps", "6",
        "--ssba_batch_size", "16", "--ssba_lr", "1e-3", "--ssba_l2_activation_acc", "0", "--ssba_l2_loss_await", "0",
        "--ssba_l2_loss_ramp", "2",
        "--device", "cpu", "--amp", "false", "--channels_last", "false"]


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared: tiny convolutions on two oversubscribed threads run ~8x slower than on one
    (results are compared within one thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_for(root, res_root, *extra):
    return ssba.configure(["--dataset_path", str(root), "--resource_root", str(res_root), *TINY, *extra])[0]


# --- §9.1 BCH -----------------------------------------------------------------------------------------------

def test_bch_matches_bchlibs_vectors():
    assert bch_generator(5) == 0xCA76024D7 and bch_generator(2) == 0x4377
    for secret, length, ecc in (("a", 100, "8693e147e0"), ("stega!!", 100, "348cc1e560"), ("abcd", 100, "58b5f29ae0"),
                                ("a", 50, "7f80"), ("abcd", 50, "c088")):
        assert bch_ecc(secret_bytes(secret, length), {100: 5, 50: 2}[length]).hex() == ecc
        b = fingerprint(secret, length)
        assert b.shape == (length,) and b[-(4 if length == 100 else 2):].sum() == 0
    assert "".join(str(int(v)) for v in fingerprint("a", 100)) == B_STAR_A
    assert code_bits(100) == 91 and code_bits(50) == 46
    for secret, length in (("abcdefgh", 100), ("abcde", 50), ("a", 64)):
        with pytest.raises(UserError):
            fingerprint(secret, length)
    b = fingerprint("a", 100)
    noisy = b.clone().repeat(3, 1)
    noisy[1, :5] = 1 - noisy[1, :5]              # t = 5 errors: still recovered
    noisy[2, :6] = 1 - noisy[2, :6]
    noisy[0, 95:] = 1 - noisy[0, 95:]            # padding bits do not count
    assert secret_recovered(noisy, b).tolist() == [True, True, False]


# --- §9.2, §9.3 networks and padding --------------------------------------------------------------------------

def count(net):
    return sum(p.numel() for p in net.parameters())


def test_network_shapes_parameter_counts_and_padding():
    for (h, c) in ((28, 1), (32, 3), (64, 3)):
        R = 32 if h <= 32 else 64
        E, D = make_networks(c, R, 100, 2, False, 0)
        x = torch.rand(2, c, h, h)
        y = encode(E, torch.randint(0, 2, (2, 100)).float(), x)
        assert y.shape == x.shape and 0 < y.min() and y.max() < 1
        assert D(pad(y, R)).shape == (2, 100)
    E, D = make_networks(3, 32, 100, 32, False, 0)
    assert (count(E), count(D)) == (1_069_315, 441_284)
    assert count(make_networks(3, 64, 100, 32, False, 0)[1]) == 637_892
    assert tuple(map(count, make_networks(1, 32, 100, 8, False, 0))) == (88_113, 88_556)
    x = torch.rand(3, 1, 28, 28) + 1
    z = pad(x, 32)
    assert (z[..., 2:30, 2:30] == x).all() and z[..., :2, :].sum() == 0 and z[..., 30:].sum() == 0
    assert torch.equal(crop(z, 28), x)


def test_stegastamps_initialisation_and_a_wider_decoder():
    """init="stegastamp": He-normal encoder weights (std sqrt(2 / fan_in)), Glorot-uniform decoder weights (bound
    sqrt(6 / (fan_in + fan_out))), zero biases; decoder_width widens only the decoder; the resource name says so."""
    E, D = make_networks(1, 32, 100, 8, False, 0, decoder_width=32, init="stegastamp")
    assert count(E) == 88_113 and count(D) == 441_284 - 2 * 9 * 32          # BackdoorBench's decoder, 1 channel in
    assert all((m.bias == 0).all() for m in [*E.modules(), *D.modules()] if isinstance(m, (torch.nn.Conv2d,
                                                                                           torch.nn.Linear)))
    w = E.conv5.weight                                                        # 8w x 4w x 3 x 3: 9,216 weights
    assert abs(w.std().item() / (2 / (4 * 8 * 9)) ** 0.5 - 1) < 0.05
    v, (fan_out, fan_in) = D.dense[3].weight, D.dense[3].weight.shape
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    default_E, _ = make_networks(1, 32, 100, 8, False, 0)                     # PyTorch's: biases not zero
    assert (default_E.conv5.bias != 0).all()
    with pytest.raises(ValueError, match="init"):
        make_networks(1, 32, 100, 8, False, 0, init="keras")
    cfg = {"dataset": "fashion_mnist", "ssba_width": 8, "ssba_decoder_width": 32, "resource_seed": 0}
    assert ssba.resource_name(cfg) == "ssba_fashion_mnist_stegastamp8_dec32_s0"
    assert ssba.resource_name({**cfg, "ssba_decoder_width": None}) == "ssba_fashion_mnist_stegastamp8_s0"


# --- §9.4 canonical encoding, §9.5 the L2 schedule -------------------------------------------------------------

def test_canonical_encoding_is_independent_of_chunks_and_threads_and_the_quantiser():
    E, _ = make_networks(1, 32, 50, 2, False, 3)
    E64, b = float64_encoder(E), fingerprint("a", 50)
    x = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    one = canonical_encode(E64, b, x, chunk=1)
    assert torch.equal(one, canonical_encode(E64, b, x, chunk=256))
    torch.set_num_threads(2)                       # the fixture's 1 thread, then 2
    assert torch.equal(one, canonical_encode(E64, b, x)) and (one != x).any()
    v = torch.tensor([0.5, 1.5, 2.5, 254.7], dtype=torch.float64) / 255
    assert quantize(v).tolist() == [0, 2, 2, 255]
    assert quantize(torch.tensor([1.0000001, -0.2], dtype=torch.float64)).tolist() == [255, 0]
    # the trigger: table entries, missing ones computed and added; a table lookup equals the recomputation
    trig = ssba.SSBATrigger(b, (1, 28, 28), E)
    idx = torch.tensor([7, 2, 9])
    first = trig.apply(x[:3], idx)
    assert torch.equal(first, one[:3]) and trig.table["train"][0].tolist() == [2, 7, 9]
    again = trig.apply(x[[1, 0]], torch.tensor([2, 7]))            # from the table
    assert torch.equal(again, one[[1, 0]]) and len(trig.table["test"][0]) == 0


def test_the_l2_schedule_and_its_activation():
    lam = lambda s: l2_weight(s, 10.0, 1000, 3000)   # noqa: E731
    assert [lam(s) for s in (-1, 1000, 1001, 2500, 4000, 9999)] == [0, 0, 10 / 3000, 5, 10, 10]
    assert lam(torch.tensor(2500.0, dtype=torch.float64)).item() == 5
    s, seen = torch.tensor(-1.0, dtype=torch.float64), []
    for acc in (0.5, 0.9, 0.95, 0.2, 0.1, 0.99):
        s = next_counter(s, torch.tensor(acc, dtype=torch.float64), 0.9)
        seen.append(s.item())
    assert seen == [-1, -1, 0, 1, 2, 3]          # 0.9 exactly does not activate; never undone


# --- §9.6, §9.7 the resource -------------------------------------------------------------------------------

def test_the_encoder_resource_is_reproducible_reused_and_refused_when_foreign(tmp_path, fake_root):
    cfg = cfg_for(fake_root, tmp_path)
    ds = load_dataset("fashion_mnist", fake_root)
    res = ssba.obtain_encoder(cfg, ds)
    name = "ssba_fashion_mnist_stegastamp2_s0"
    assert res.built and res.path == tmp_path / name and res.meta["activation_step"] == 1
    assert {"train_seconds", "final_bit_acc", "device", "psnr_mean"} <= set(res.meta)
    assert {"tensors.safetensors", "metrics.csv", "samples.png", "log.txt"} <= set(res.meta["files"])
    t = res.tensors()
    assert "encoder.conv1.weight" in t and "decoder.dense.1.weight" in t and len(t["curve.bit_acc"]) == 1
    assert not ssba.obtain_encoder(cfg, ds).built                               # reused
    with pytest.raises(UserError, match=r"other settings.*params.*wanted.*found"):
        ssba.obtain_encoder({**cfg, "ssba_lr": 2e-3}, ds)
    x2 = ds.x_train.clone()
    x2[0, 0, 0, 0] ^= 1
    with pytest.raises(UserError, match="another dataset or other training data.*train_images_sha256"):
        ssba.obtain_encoder(cfg, dataclasses.replace(ds, x_train=x2))
    # --resource_rebuild: the old folder aside, a new build bit-identical to it (same seed, same machine)
    again = ssba.obtain_encoder({**cfg, "resource_rebuild": True}, ds)
    old = [p for p in tmp_path.iterdir() if p.name.startswith(f"{name}.old-")]
    assert again.built and len(old) == 1
    assert (old[0] / "tensors.safetensors").read_bytes() == (again.path / "tensors.safetensors").read_bytes()
    # an interrupted build (its hidden partial folder) is refused; --resume trains it again from scratch
    (tmp_path / ".ssba_fashion_mnist_stegastamp2_s1.partial").mkdir()
    with pytest.raises(UserError, match="interrupted.*--resume"):
        ssba.obtain_encoder({**cfg, "resource_seed": 1}, ds)
    other = ssba.obtain_encoder({**cfg, "resource_seed": 1}, ds, resume=True)
    assert other.name.endswith("_s1") and not torch.equal(other.tensors()["encoder.conv1.weight"],
                                                          t["encoder.conv1.weight"])
    (again.path / "tensors.safetensors").write_bytes(b"tampered")
    with pytest.raises(UserError, match="damaged: tensors.safetensors"):
        ssba.obtain_encoder(cfg, ds)
    (tmp_path / "ssba_fashion_mnist_stegastamp2_s5").mkdir()
    with pytest.raises(UserError, match="incomplete"):
        ssba.obtain_encoder({**cfg, "resource_seed": 5}, ds)
    # a build whose L2 term never starts fails and leaves only a .failed- folder
    with pytest.raises(UserError, match="never reached a batch bit accuracy above 1.0 in 6 steps"):
        ssba.obtain_encoder({**cfg, "resource_seed": 2, "ssba_l2_activation_acc": 1.0}, ds)
    left = [p.name for p in tmp_path.iterdir() if "_s2" in p.name and not p.name.startswith(".")]   # but the lock
    assert len(left) == 1 and left[0].startswith("ssba_fashion_mnist_stegastamp2_s2.failed-")


# --- §9.8, §9.10 the record ---------------------------------------------------------------------------------

def test_a_record_rebuilds_without_its_resource_and_its_table_equals_recomputation(tmp_path, fake_root):
    path, res_root = tmp_path / "ssba", tmp_path / "resources"
    s = ssba.main(["--dataset_path", str(fake_root), "--resource_root", str(res_root), "--save_folder_name", str(path),
                   "--epochs", "1", "--batch_size", "64", *TINY])
    assert s["resource_reused"] is False and s["ssba_psnr_mean"] > 0 and "encode_seconds" in s
    assert json.loads((path / "summary.json").read_text())["resource_train_seconds"] is not None
    assert (path / "trigger_difference.png").stat().st_size > 0 and "encoder resource" in (path / "log.txt").read_text()
    shutil.rmtree(res_root)                                                    # the record alone suffices
    rec = load_attack_record(path)
    poison, d = rec.poison, rec.data
    idx = torch.tensor(poison["poison_indices"])
    assert len(idx) == 60 and (d.y_train[idx] == 0).all() and (d.y_train_true[idx] == 0).any()  # target class too
    assert (d.y_bd_test_true != 0).all() and len(d.y_bd_test) == 180
    spec = poison["trigger"]
    assert spec["kind"] == "ssba" and spec["table"]["n_train"] == 60 and spec["table"]["n_test"] == 180
    assert spec["source"]["resource"] == "ssba_fashion_mnist_stegastamp2_s0" and "ssba_stealth" in spec
    # the encoder alone (no table) recomputes the same images
    trig = ssba.SSBATrigger.from_record(spec, load_tensors(path))
    assert trig.encoder is not None and torch.equal(trig.table["train"][0], idx)
    fresh = ssba.SSBATrigger(trig.b_star, (1, 28, 28), trig.encoder)
    plan = PoisonPlan("all2one", 0, 1, torch.empty(0, dtype=torch.int64), idx)
    assert build_poisoned_data(rec.dataset, fresh, plan).digests() == d.digests()
    # a changed encoder weight is caught
    t = load_tensors(path)
    t["encoder.conv1.bias"] = t["encoder.conv1.bias"] + 1e-3
    with pytest.raises(ValueError, match="encoder_sha256"):
        ssba.SSBATrigger.from_record(spec, t)


def load_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path / "trigger.safetensors"))


# --- §9.9 import of BackdoorBench's arrays, §9.10 all2all ---------------------------------------------------

def test_backdoorbench_arrays_are_imported_by_index_and_bad_ones_refused(tmp_path, fake_root):
    g = np.random.default_rng(0)
    train, test = (g.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) for n in (600, 200))
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", test)
    path = tmp_path / "imported"
    s = ssba.main(["--dataset_path", str(fake_root), "--save_folder_name", str(path), "--epochs", "1",
                   "--batch_size", "64", "--device", "cpu", "--amp", "false", "--attack_label_trans", "all2all",
                   "--attack_train_replace_imgs_path", str(tmp_path / "train.npy"),
                   "--attack_test_replace_imgs_path", str(tmp_path / "test.npy")])
    assert s["resource_reused"] is None and s["ssba_secret_recovery"] is None
    rec = load_attack_record(path)
    d, idx = rec.data, torch.tensor(rec.poison["poison_indices"])
    assert torch.equal(d.x_train[idx], torch.from_numpy(train[idx.numpy()]).permute(0, 3, 1, 2))
    assert torch.equal(d.x_bd_test, torch.from_numpy(test).permute(0, 3, 1, 2))   # all2all: every test image
    assert torch.equal(d.y_bd_test, (d.y_bd_test_true + 1) % 10)
    assert torch.equal(d.y_train[idx], (d.y_train_true[idx] + 1) % 10)
    spec = rec.poison["trigger"]
    assert "encoder_sha256" not in spec and len(spec["source"]["import"]["train"]["sha256"]) == 64
    for bad in ((599, 28, 28, 1), (600, 28, 28, 3), (600, 32, 28, 1)):
        np.save(tmp_path / "bad.npy", np.zeros(bad, dtype=np.uint8))
        with pytest.raises(UserError, match=rf"shape \({', '.join(map(str, bad))}\).*\(600, 28, 28, 1\)"):
            ssba.load_replacement(tmp_path / "bad.npy", 600, (1, 28, 28), "train")
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="pickled arrays are refused"):
        ssba.load_replacement(tmp_path / "pickled.npy", 600, (1, 28, 28), "train")
    with pytest.raises(UserError, match="both"):
        ssba.configure(["--dataset_path", str(fake_root), "--attack_train_replace_imgs_path", "x.npy"])
    with pytest.raises(UserError, match="at most 4"):
        ssba.configure(["--dataset_path", str(fake_root), "--ssba_fingerprint_length", "50", "--ssba_secret", "abcde"])
