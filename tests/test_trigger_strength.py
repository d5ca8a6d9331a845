"""bench/trigger_strength.py: ASR at a fraction of the trigger, each strength on the right images."""
import json

import pytest
import torch

from bench.trigger_strength import main, partial_trigger, strength_table
from utils.errors import UserError
from utils.record import load_attack_record
from utils.engine.device import Precision

CPU = torch.device("cpu")


def test_partial_trigger_moves_each_pixel_the_given_fraction_of_the_way():
    clean = torch.tensor([[[[0, 100], [255, 51]]]], dtype=torch.uint8)
    triggered = torch.tensor([[[[255, 100], [0, 255]]]], dtype=torch.uint8)
    assert partial_trigger(clean, triggered, 0.0).tolist() == (clean.float() / 255).tolist()
    assert partial_trigger(clean, triggered, 1.0).tolist() == (triggered.float() / 255).tolist()
    half = partial_trigger(clean, triggered, 0.5)
    assert half.flatten().tolist() == pytest.approx([0.5, 100 / 255, 0.5, 153 / 255])


def test_strength_one_is_the_attack_and_zero_the_clean_images(tiny_record):
    table = strength_table(str(tiny_record), [str(tiny_record)], (0.0, 0.5, 1.0), Precision(CPU, False, False), CPU)
    asr0, asr_half, asr1 = table[str(tiny_record)]
    summary = json.loads((tiny_record / "summary.json").read_text())
    assert asr1 == pytest.approx(summary["test_asr"], abs=1e-6)
    rec = load_attack_record(str(tiny_record))
    model, d = rec.model.eval(), rec.data
    with torch.no_grad():   # by hand: the same non-target test images, clean and half-triggered
        x = d.x_test[d.bd_test_indices].float() / 255
        pred0 = model(x).argmax(1)
        pred_half = model(x + 0.5 * (d.x_bd_test.float() / 255 - x)).argmax(1)
    assert asr0 == pytest.approx((pred0 == d.y_bd_test).double().mean().item(), abs=1e-6)
    assert asr_half == pytest.approx((pred_half == d.y_bd_test).double().mean().item(), abs=1e-6)


def test_strengths_outside_0_1_are_refused(tiny_record):
    with pytest.raises(UserError, match="outside \\[0, 1\\]"):
        main(["--record", str(tiny_record), "--models", str(tiny_record), "--strengths", "0.5,1.5"])
