"""Model files (model.pt): weights only, with what rebuilds the model (name, width, K, input shape, mean/std), read
with torch.load(weights_only=True); a damaged file is one line naming it."""
from pathlib import Path

from utils.errors import UserError
from utils.io import load_weights
from utils.record_names import READABLE_VERSIONS

MODEL_KEYS = ("model_name", "num_classes", "input_shape", "mean", "std")


def model_payload(model, model_name, input_shape, width, dataset):
    return {"model_name": model_name, "num_classes": model.num_classes, "input_shape": list(input_shape),
            "width": width, "dataset": dataset, "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(), "state_dict": model.state_dict()}


def read_model_file(path, device="cpu") -> dict:
    """A model.pt as its dict (weights only), checked to be this toolkit's format and version."""
    path = Path(path)
    d = load_weights(path, "model file", device)
    if not isinstance(d, dict):
        raise UserError(f"model file {path} holds a {type(d).__name__}, not this toolkit's dict of weights and settings")
    if d.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"model file {path} has record format version {d.get('format_version')}, this toolkit reads "
                        f"versions {', '.join(map(str, READABLE_VERSIONS))}; make the record again with this version")
    return d


def build_from_file(d: dict, path, weights_key="state_dict", device="cpu"):
    """The model that a model.pt dict describes, with its weights loaded."""
    from models import build_model
    missing = [k for k in (*MODEL_KEYS, weights_key) if k not in d]
    if missing:
        raise UserError(f"model file {path} lacks {', '.join(missing)}; the file is damaged: make the record again")
    try:
        model = build_model(d["model_name"], d["num_classes"], d["input_shape"][0], d["mean"], d["std"], d.get("width"))
    except (ValueError, TypeError, IndexError) as e:
        raise UserError(f"model file {path} describes no model this toolkit can build ({e}); make the record again") \
            from None
    try:
        model.load_state_dict(d[weights_key])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"the weights in model file {path} do not fit a {d['model_name']} ({first}); the file is "
                        "damaged: make the record again") from None
    return model.to(device).eval()


def load_model_file(path, device="cpu"):
    """Rebuild a plain model from a weights-only model.pt. A PDB file (a defended model) is refused here."""
    d = read_model_file(path, device)
    if "state_dict" not in d and "defense" in d:
        raise UserError(f"{path} holds a defended model ({d.get('defense', 'unknown')}), not plain weights; "
                        "load it with utils.record.load_defense_model")
    return build_from_file(d, path, "state_dict", device), d


# A defense whose deployed model is not a plain network (PDB's input stamp and output mapping) registers how to rebuild
# it from its model.pt: @register_wrapper("pdb") on a function (d, path, device) -> model. Its model.pt has a
# "defense" key naming it and no "state_dict" (so load_model_file refuses it instead of returning the raw network).
WRAPPERS: dict = {}


def register_wrapper(kind):
    def add(fn):
        WRAPPERS[kind] = fn
        return fn
    return add


def load_defense_model(path, device="cpu"):
    """The model a defense record's model.pt holds, in eval mode: a registered wrapper (PDB's DefendedModel) or a
    plain model."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    d = read_model_file(path, device)
    if "state_dict" in d or "defense" not in d:
        return build_from_file(d, path, "state_dict", device)
    if d["defense"] not in WRAPPERS:
        from utils.registry import discover
        discover()   # the defense's own file registers its wrapper
    if d["defense"] not in WRAPPERS:
        raise UserError(f"{path} holds a {d['defense']!r} model that this toolkit cannot rebuild")
    return WRAPPERS[d["defense"]](d, path, device).eval()
