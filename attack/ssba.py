"""SSBA (Li, Li, Wu, Li, He, Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021, arXiv
2012.03816; spec: docs/specs/ssba.md). A steganography encoder E (StegaStamp-style, utils/stegastamp.py) hides one
bit string b* (the BCH codeword of a short secret) in every image it poisons, so each poisoned image carries its
own invisible perturbation, spread over the whole image, instead of one shared pattern; the poisoned images get
the target label and the victim learns "carries the encoder's signature" -> target. Static data poisoning
(BadNets' plan, conventions §7.2).

    python attack/ssba.py --save_folder_name ssba_demo

The encoder/decoder pair is a resource the toolkit trains itself on the whole clean training split (BackdoorBench
only loads pre-made arrays): record/resources/ssba_<dataset>_stegastamp<width>_s<resource_seed>/, found and reused,
built when absent (a progress bar; minutes on a CPU at fashion_mnist size), refused when made for something else.
The record's trigger.safetensors holds the encoder, b* and the canonical poisoned images of the poisoned training
and test indices (a table: float64 re-encoding costs minutes), so a record rebuilds without the resource folder.
BackdoorBench's packed .npy arrays are imported with attack_train_replace_imgs_path / attack_test_replace_imgs_path.
"""
import hashlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from utils.attack import attack_config, prepare_data, run_attack
from utils.config import Opt, in_range, spec_deviations
from utils.data import dataset_info, load_dataset
from utils.engine.device import device_check, pick_device
from utils.errors import UserError, run_main
from utils.io import atomic_write_text
from utils.registry import register
from utils.resources import (data_identity, file_digest, obtain, resource_options, resource_root, resource_seed,
                             save_tensors)
from utils.seeding import set_determinism
from utils.stegastamp import (BCH_T, CURVE, INITS, StegaStampEncoder, TrainSettings, bit_figures, canonical_encode,
                              evaluate_stegastamp, fingerprint, float64_encoder, make_networks, padded_size, stealth,
                              train_stegastamp)
from utils.triggers import pattern_png_bytes, register_trigger

OPTIONS = [
    Opt("ssba_secret", str, "a", "the secret every poisoned image carries (UTF-8; at most 7 bytes for 100 bits, 4 "
        "for 50)"),
    Opt("ssba_fingerprint_length", int, 100, "L, bits per string (BCH t 5 for 100, t 2 for 50)", choices=(50, 100)),
    Opt("ssba_width", int, 32, "base channels of the encoder (w..8w) and decoder (w..4w)", check=in_range(1)),
    Opt("ssba_decoder_width", int, None, "base channels of the decoder when not ssba_width (its last layer has 4x "
        "as many features for the L bits)", check=in_range(1)),
    Opt("ssba_init", str, "pytorch", "initialisation of the pair: pytorch (BackdoorBench's port) or stegastamp (the "
        "TF original: He-normal encoder, Glorot decoder, zero biases)", choices=INITS),
    Opt("ssba_use_residual", bool, False, "the encoder outputs a residual added to the image (false: the image, "
        "through a sigmoid, BackdoorBench's default)"),
    Opt("ssba_num_epochs", int, 20, "encoder training: passes over the training split", check=in_range(1)),
    Opt("ssba_num_steps", int, None, "encoder training: steps (replaces ssba_num_epochs)", check=in_range(1)),
    Opt("ssba_batch_size", int, 64, "encoder training batch (the last partial batch kept)", check=in_range(1)),
    Opt("ssba_lr", float, 1e-4, "Adam learning rate of encoder + decoder", check=in_range(0, lo_open=True)),
    Opt("ssba_l2_loss_weight", float, 10.0, "W, final weight of the image MSE", check=in_range(0)),
    Opt("ssba_l2_loss_await", int, 1000, "A, steps after activation with weight 0", check=in_range(0)),
    Opt("ssba_l2_loss_ramp", int, 3000, "Rm, steps of the linear ramp to W", check=in_range(1)),
    Opt("ssba_bce_loss_weight", float, 1.0, "weight of the bit cross-entropy", check=in_range(0)),
    Opt("ssba_l2_activation_acc", float, 0.9, "a batch bit accuracy strictly above this starts the L2 schedule",
        check=in_range(0, 1)),
    Opt("ssba_encode_device", str, "cpu", "device of the canonical float64 encoding (cuda: faster, recorded)",
        check=device_check),
    Opt("attack_train_replace_imgs_path", str, None, "BackdoorBench's packed poisoned training images (.npy, "
        "N_train x H x W x C uint8); with the test file: no encoder is trained"),
    Opt("attack_test_replace_imgs_path", str, None, "the same for the test split"),
    *resource_options(),
]
CHUNK = 256
# docs/specs/ssba.md §3: the project's proposal for the 28 x 28 sets (config/attack/ssba/<dataset>.yaml)
PROPOSAL = {"ssba_width": 8, "ssba_decoder_width": 32, "ssba_init": "stegastamp", "ssba_num_steps": 8000,
            "ssba_l2_loss_await": 250, "ssba_l2_loss_ramp": 750}
SPEC = {"fashion_mnist": PROPOSAL, "mnist": PROPOSAL}


# --- the trigger (spec §5.6) -------------------------------------------------------------------------------

def state_sha256(module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def table_sha256(table) -> str:
    h = hashlib.sha256()
    for split in ("train", "test"):
        for t in table[split]:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@register_trigger
class SSBATrigger:
    """E(b*, x), canonical: float64 on encode_device, chunks of 256 in index order, round half to even. apply
    returns the table's image of each index of its split and computes (and adds) the missing ones: with the
    encoder, or from imported arrays (`rows`, split -> an (N, H, W, C) array; never saved: only their table rows).
    The table is keyed by index, so apply must be given the split's clean images (build_poisoned_data does)."""
    kind: ClassVar[str] = "ssba"

    def __init__(self, b_star, shape, encoder=None, table=None, info=None, encode_device="cpu", rows=None):
        self.b_star, self.shape, self.encoder = b_star, tuple(shape), encoder
        empty = (torch.empty(0, dtype=torch.int64), torch.empty((0, *shape), dtype=torch.uint8))
        self.table = dict(table or {"train": empty, "test": empty})
        self.info, self.encode_device, self.rows = dict(info or {}), encode_device, rows
        self._e64, self.encode_seconds = None, 0.0

    def make(self, x, idx, split):
        if self.encoder is not None:
            if self._e64 is None:
                self._e64 = float64_encoder(self.encoder, pick_device(self.encode_device))
            t0 = time.time()
            out = canonical_encode(self._e64, self.b_star, x.cpu(), self._e64.conv1.weight.device, CHUNK)
            self.encode_seconds += time.time() - t0
            return out
        if self.rows is not None and idx is not None:
            return torch.from_numpy(np.ascontiguousarray(self.rows[split][idx.numpy()].transpose(0, 3, 1, 2)))
        raise ValueError(f"the record stores no poisoned {'training' if split == 'train' else 'test'} image for some "
                         "of these indices and has no encoder to make them")

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        split = "train" if train else "test"
        if idx is None:   # images without indices: encoded, never looked up or added to the table
            return self.make(x, None, split).to(x.device)
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        keys, images = self.table[split]
        pos = torch.searchsorted(keys, idx).clamp(max=max(len(keys) - 1, 0))
        miss = torch.ones(len(idx), dtype=torch.bool) if not len(keys) else keys[pos] != idx
        if miss.any():   # add them, keys kept sorted and unique
            k2 = torch.cat([keys, idx[miss]])
            im2 = torch.cat([images, self.make(x[miss.to(x.device)], idx[miss], split)])
            order = torch.argsort(k2, stable=True)
            k2, im2 = k2[order], im2[order]
            first = torch.ones(len(k2), dtype=torch.bool)
            first[1:] = k2[1:] != k2[:-1]
            keys, images = self.table[split] = (k2[first], im2[first])
            pos = torch.searchsorted(keys, idx)
        return images[pos].to(x.device)

    def spec(self):
        length = self.b_star.numel()
        enc = self.encoder
        net = {} if enc is None else {"size": enc.size, "width": enc.width, "use_residual": enc.residual,
                                      "encoder_sha256": state_sha256(enc)}
        return {"kind": self.kind, "shape": list(self.shape), "length": length, **net,
                "bch": {"m": 7, "prim_poly": 137, "t": BCH_T[length]},
                "fingerprint": "".join(str(int(v)) for v in self.b_star), "quantisation": "round_half_even_float64",
                "encode_device": self.encode_device, "canonical_chunk": CHUNK,
                "table": {"n_train": len(self.table["train"][0]), "n_test": len(self.table["test"][0]),
                          "sha256": table_sha256(self.table)}, **self.info}

    def tensors(self):
        enc = {} if self.encoder is None else {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        return {**enc, "fingerprint": self.b_star, "train_indices": self.table["train"][0],
                "train_images": self.table["train"][1], "test_indices": self.table["test"][0],
                "test_images": self.table["test"][1]}

    @classmethod
    def from_record(cls, spec, tensors):
        encoder = None
        if "encoder_sha256" in spec:
            c = spec["shape"][0]
            encoder = StegaStampEncoder(c, spec["size"], spec["length"], spec["width"], spec["use_residual"])
            encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
            if state_sha256(encoder) != spec["encoder_sha256"]:
                raise ValueError("the encoder weights do not match encoder_sha256")
        table = {s: (tensors[f"{s}_indices"], tensors[f"{s}_images"]) for s in ("train", "test")}
        if table_sha256(table) != spec["table"]["sha256"]:
            raise ValueError("the table of poisoned images does not match its digest")
        return cls(tensors["fingerprint"], spec["shape"], encoder.eval() if encoder else None, table,
                   encode_device=spec.get("encode_device", "cpu"))


# --- the resource: the trained encoder/decoder (spec §5.4, §5.5) -------------------------------------------

def encoder_settings(cfg) -> TrainSettings:
    return TrainSettings(cfg["ssba_fingerprint_length"], cfg["ssba_width"], decoder_width(cfg), cfg["ssba_init"],
                         cfg["ssba_use_residual"],
                         cfg["ssba_num_epochs"], cfg["ssba_num_steps"], cfg["ssba_batch_size"], cfg["ssba_lr"],
                         cfg["ssba_l2_loss_weight"], cfg["ssba_l2_loss_await"], cfg["ssba_l2_loss_ramp"],
                         cfg["ssba_bce_loss_weight"], cfg["ssba_l2_activation_acc"])


def decoder_width(cfg) -> int:
    return cfg["ssba_decoder_width"] or cfg["ssba_width"]


def resource_name(cfg) -> str:
    w, dw = cfg["ssba_width"], decoder_width(cfg)
    return f"ssba_{cfg['dataset']}_stegastamp{w}{f'_dec{dw}' if dw != w else ''}_s{resource_seed(cfg)}"


def resource_identity(cfg, dataset) -> dict:
    st = encoder_settings(cfg)
    c, h, _ = dataset.info.shape
    params = {"format": 1, "channels": c, "size": padded_size(h), **asdict(st)}
    params["epochs"] = None if st.steps is not None else st.epochs    # replaced by steps: not a setting then
    return {"kind": "ssba", **data_identity(dataset), "params": params, "seed": resource_seed(cfg)}


def samples_figure(clean, encoded) -> bytes:
    """One PNG mosaic (fast: no plotting library): a row of clean images, the row encoded, the row of |difference|
    x 10, 2-pixel gaps."""
    diff = ((encoded.float() - clean.float()).abs() * 10).clamp(0, 255).to(torch.uint8)
    n, c, h, w = clean.shape
    out = torch.full((c, 3 * h + 4, n * (w + 2) - 2), 128, dtype=torch.uint8)
    for j, row in enumerate((clean, encoded, diff)):
        tiles = torch.cat([torch.cat([img, torch.full((c, h, 2), 128, dtype=torch.uint8)], 2) for img in row], 2)
        out[:, j * (h + 2):j * (h + 2) + h] = tiles[..., :out.shape[-1]]
    return pattern_png_bytes(out)


def build_encoder(folder: Path, cfg, dataset, name) -> dict:
    """Train, check, evaluate and write the resource's files into `folder` (obtain's partial folder); returns the
    entries of resource.json. A build whose L2 term never started is moved aside as <name>.failed-<UTC time>."""
    lines = []

    def log(line):
        print(line)
        lines.append(line)
    st, seed = encoder_settings(cfg), resource_seed(cfg)
    device = pick_device(cfg["device"])
    set_determinism(cfg["deterministic"], device)
    channels_last = cfg["channels_last"] is not False     # auto: on (2.3x faster on a CPU, spec §3)
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    log(f"resource {name}: training the SSBA encoder/decoder (widths {st.width}/{st.decoder_width}, L {st.length}, "
        f"{st.init} init) on the {len(dataset.y_train)} training images of {dataset.info.name}, {st.steps or st.epochs} "
        f"{'steps' if st.steps else 'epochs'}, batch {st.batch_size}, lr {st.lr}, on {device} (fp32"
        f"{', channels_last' if channels_last else ''})")
    tr = train_stegastamp(dataset.x_train, st, seed, device, channels_last, log)
    if tr.activation_step is None:
        atomic_write_text(folder / "log.txt", "\n".join(lines) + "\n")
        failed = folder.parent / f"{name}.failed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        os.rename(folder, failed)
        raise UserError(f"the SSBA encoder never reached a batch bit accuracy above {st.activation_acc} in "
                        f"{tr.steps} steps, so its image loss never started and its images are not tied to the "
                        f"originals; the build is kept at {failed}. Raise --ssba_num_steps (or --ssba_num_epochs) or "
                        "lower --ssba_lr")
    log(f"L2 schedule started at step {tr.activation_step}; final lambda {tr.final_l2_weight:.4g}, final bit accuracy "
        f"{tr.final_bit_acc:.4f}; {tr.seconds:.1f} s")
    if tr.final_l2_weight < st.l2_weight:
        log(f"warning: the L2 ramp did not finish (lambda {tr.final_l2_weight:.4g} < W {st.l2_weight}): the encodings "
            "are less constrained than planned; more steps finish it")
    t0 = time.time()
    b_a = fingerprint("a", st.length)
    figures = evaluate_stegastamp(tr.encoder, tr.decoder, dataset.x_test, b_a, seed, device)
    eval_seconds = round(time.time() - t0, 2)
    log("test split: bit accuracy {bit_acc_test_random:.4f} (random strings), {bit_acc_test_secret_a:.4f} (secret a), "
        "secret recovered {secret_recovery_test_a:.4f}; PSNR {psnr_mean:.2f} dB, mean |diff| {residual_mean:.2f}, "
        "max {residual_max:.0f} grey levels".format(**figures))
    save_tensors(folder, {**{f"encoder.{k}": v for k, v in tr.encoder.state_dict().items()},
                          **{f"decoder.{k}": v for k, v in tr.decoder.state_dict().items()},
                          "fingerprint_a": b_a,   # wall-clock times stay in metrics.csv: the tensors reproduce
                          **{f"curve.{k}": v for k, v in tr.curve.items() if k != "seconds"}})
    rows = zip(*(tr.curve[k].tolist() for k in CURVE))
    atomic_write_text(folder / "metrics.csv", ",".join(CURVE) + "\n" + "".join(
        ",".join(str(int(v)) if k in ("step", "epoch") else f"{v:.6g}" for k, v in zip(CURVE, r)) + "\n" for r in rows))
    show = dataset.x_test[:8]
    (folder / "samples.png").write_bytes(samples_figure(show, canonical_encode(float64_encoder(tr.encoder), b_a, show)))
    atomic_write_text(folder / "log.txt", "\n".join(lines) + "\n")
    return {"train_seconds": tr.seconds, "eval_seconds": eval_seconds, "steps": tr.steps,
            "activation_step": tr.activation_step, "final_l2_weight": tr.final_l2_weight,
            "final_bit_acc": tr.final_bit_acc, **figures, "device": str(device),
            "precision": f"fp32{' + channels_last' if channels_last else ''}", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "start_time": start,
            "data": "the whole training split (the reserve included), never test images"}


def obtain_encoder(cfg, dataset, resume=False):
    name = resource_name(cfg)
    return obtain(resource_root(cfg), name, resource_identity(cfg, dataset),
                  lambda folder, resumed: build_encoder(folder, cfg, dataset, name),
                  rebuild=cfg["resource_rebuild"], resume=resume, resumable=False)


def networks(res, cfg, dataset):
    """(E, D) of a resource, fp32 on the CPU, eval mode."""
    t, (c, h, _) = res.tensors(), dataset.info.shape
    E, D = make_networks(c, padded_size(h), cfg["ssba_fingerprint_length"], cfg["ssba_width"],
                         cfg["ssba_use_residual"], 0, decoder_width(cfg))
    for prefix, net in (("encoder.", E), ("decoder.", D)):
        net.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
    return E.eval(), D.eval()


# --- BackdoorBench's packed arrays (spec §2) -----------------------------------------------------------------

def load_replacement(path, n, shape, split):
    """An (n, H, W, C) uint8 array, memory-mapped, read without unpickling anything."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"attack_{split}_replace_imgs_path {p} not found; pass BackdoorBench's packed .npy file")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{p} cannot be read as a plain .npy array ({e}); pickled arrays are refused") from None
    c, h, w = shape
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != (n, h, w, c):
        raise UserError(f"{p} holds an array of shape {tuple(getattr(a, 'shape', ()))} ({getattr(a, 'dtype', '?')}); "
                        f"the {split} split needs ({n}, {h}, {w}, {c}) uint8, one row per image index (BackdoorBench's "
                        "save_image writes 3 channels for grey data: convert such arrays first)")
    return a


# --- the attack (spec §5.7) ----------------------------------------------------------------------------------

@register("ssba", "attack", paper="Li et al., ICCV 2021", needs=("dataset",), options=OPTIONS,
          summary="SSBA: sample-specific invisible triggers from a StegaStamp encoder the toolkit trains")
def configure(argv=None):
    """Every setting resolved and checked, nothing written, no resource built (the sweep checks its jobs with this)."""
    cfg, args = attack_config("ssba", OPTIONS, argv, __doc__)
    _, h, w = dataset_info(cfg["dataset"]).shape
    if h != w:
        raise UserError(f"SSBA's encoder takes square images; {cfg['dataset']} is {h}x{w}")
    fingerprint(cfg["ssba_secret"], cfg["ssba_fingerprint_length"])   # the secret fits the string
    if (cfg["attack_train_replace_imgs_path"] is None) != (cfg["attack_test_replace_imgs_path"] is None):
        raise UserError("give both attack_train_replace_imgs_path and attack_test_replace_imgs_path (an import), or "
                        "neither (the toolkit's encoder)")
    return cfg, args


def make_trigger(cfg, dataset, resume=False):
    """(the resource or None, the trigger): the toolkit's encoder, or the imported arrays."""
    b_star, info = fingerprint(cfg["ssba_secret"], cfg["ssba_fingerprint_length"]), dataset.info
    if cfg["attack_train_replace_imgs_path"] is not None:
        rows, source = {}, {}
        for split, n in (("train", len(dataset.y_train)), ("test", len(dataset.y_test))):
            path = cfg[f"attack_{split}_replace_imgs_path"]
            rows[split] = load_replacement(path, n, info.shape, split)
            source[split] = {"path": str(path), "sha256": file_digest(path)}
        return None, SSBATrigger(b_star, info.shape, info={"secret": cfg["ssba_secret"], "source": {"import": source}},
                                 rows=rows)
    res = obtain_encoder(cfg, dataset, resume)
    E, _ = networks(res, cfg, dataset)
    return res, SSBATrigger(b_star, info.shape, E, info={"secret": cfg["ssba_secret"], "source": {
        "resource": res.name, "resource_sha256": res.digest()}}, encode_device=cfg["ssba_encode_device"])


def main(argv=None):
    cfg, args = configure(argv)
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    res, trigger = make_trigger(cfg, dataset, args.resume)
    _, plan, data = prepare_data(cfg, trigger)       # the canonical poisoned images, into the trigger's table
    idx = plan.poison_indices
    figures = {"ssba_stealth": stealth(data.x_train_clean[idx], data.x_train[idx])}
    if res is not None:
        b = bit_figures(networks(res, cfg, dataset)[1], data.x_bd_test, trigger.b_star, pick_device(cfg["device"]))
        figures["ssba_decoding"] = {"bit_acc": b["bit_acc"], "secret_recovery": b["secret_recovery"]}
    st, dec = figures["ssba_stealth"], figures.get("ssba_decoding")
    made = [f"ssba: {len(idx)} training and {len(data.bd_test_indices)} test images encoded in "
            f"{trigger.encode_seconds:.1f} s: PSNR {st['psnr_mean']:.2f} dB, mean |diff| {st['residual_mean']:.2f}, "
            f"max {st['residual_max']:.0f} grey levels" + ("" if dec is None else f"; the decoder reads b* from the "
            f"poisoned test images at bit accuracy {dec['bit_acc']:.4f}, secret recovered "
            f"{dec['secret_recovery']:.4f}")]
    if res is not None:
        made.insert(0, f"ssba: encoder resource {res.name} {'built' if res.built else 'reused'} (trained in "
                       f"{res.meta.get('train_seconds')} s on {res.meta.get('device')})")
    deviations = spec_deviations([o for o in OPTIONS if o.name.startswith("ssba_")], cfg, SPEC.get(cfg["dataset"]))
    h = dataset.info.shape[1]
    if padded_size(h) != h:
        deviations.append(f"images zero-padded {h} -> {padded_size(h)} for the encoder and decoder, cropped back "
                          "(spec §5.3: the originals take multiples of 32 only)")
    extra = {"resources": [res.describe()] if res else [], "deviations": deviations,
             "ssba": {**figures, "encode_seconds": round(trigger.encode_seconds, 2)}}
    show = idx[:8]
    files = {"trigger_difference.png": samples_figure(data.x_train_clean[show], data.x_train[show])}
    own = {"resource_reused": None if res is None else not res.built,
           "resource_train_seconds": None if res is None else res.meta.get("train_seconds"),
           "encode_seconds": round(trigger.encode_seconds, 2),
           "ssba_psnr_mean": figures["ssba_stealth"]["psnr_mean"],
           "ssba_secret_recovery": figures.get("ssba_decoding", {}).get("secret_recovery")}
    return run_attack("ssba", cfg, args, trigger, figures, extra_config=extra, files=files, notes=made, summary=own)

if __name__ == "__main__":
    run_main(main)
