"""Inference: checkpoints load as one plain module, tiles blend without seams, memory decides tiling, outputs keep their format."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pydicom
import pytest
import torch
from conftest import ROOT, pydicom_test_file
from torch import nn

from memtrain.data.phantom import phantom_radiograph
from memtrain.data.readers import load_source, read_image
from memtrain.data.writers import encode, stored_values
from memtrain.errors import CheckpointError, ConfigError, MemtrainError
from memtrain.inference import SAFETY, Enhancer, blend_weights, load_model, load_trained, tile_starts
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import _REGISTRY, register


def _image(h: int, w: int, index: int = 0) -> np.ndarray:
    return phantom_radiograph(3, index, max(h, w))[:h, :w].astype(np.float32)


# ------------------------------------------------------------------ loading


def test_checkpoint_loads_weights_only_as_one_plain_module(trained_checkpoint):
    import segmentation_models_pytorch as smp

    ckpt = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    model, cfg = load_model(trained_checkpoint)
    assert type(model) is smp.Unet and not model.training
    assert cfg.model.encoder == "resnet18" and cfg.data.size == 64
    assert all(not p.requires_grad for p in model.parameters())
    # Every parameter and buffer (BatchNorm running statistics included) is the trained one.
    state = model.state_dict()
    assert set(state) == {k.removeprefix("model.") for k in ckpt["state_dict"]}
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(state[key.removeprefix("model.")], value), key
    bn = model.encoder.bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # trained statistics, not fresh ones


class _Payload:
    """Unpickling an instance needs code from this module: weights-only loading refuses it."""


def test_bad_checkpoints_are_one_line_errors(tmp_path, trained_checkpoint):
    full = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    ckpt = {"state_dict": full["state_dict"], "memtrain": full["memtrain"]}  # what loading reads; small to save
    cases = {}
    cases["folder"] = tmp_path
    cases["missing"] = tmp_path / "nope.ckpt"
    torch.save({"state_dict": {}, "memtrain": {"config": {}}, "x": _Payload()}, tmp_path / "code.ckpt")
    cases["code"] = tmp_path / "code.ckpt"
    torch.save({"a": torch.zeros(1000)}, tmp_path / "small.pt")
    data = (tmp_path / "small.pt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "plain.ckpt")
    cases["not memtrain"] = tmp_path / "plain.ckpt"
    (tmp_path / "image.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    cases["png"] = tmp_path / "image.ckpt"
    unknown = dict(ckpt, memtrain={**ckpt["memtrain"], "strategies": ["warp:9"]})
    torch.save(unknown, tmp_path / "unknown.ckpt")
    cases["unknown strategy"] = tmp_path / "unknown.ckpt"
    missing_key = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != "model.segmentation_head.0.bias"})
    torch.save(missing_key, tmp_path / "missing_key.ckpt")
    cases["missing key"] = tmp_path / "missing_key.ckpt"

    expected = {
        "folder": "is not a file",
        "missing": "no such checkpoint file",
        "code": "refused: loading it would run pickled code (GLOBAL test_inference._Payload",
        "truncated": "not a readable PyTorch checkpoint",
        "not memtrain": "not a memtrain checkpoint",
        "png": "not a readable PyTorch checkpoint",
        "unknown strategy": "trained with strategy 'warp:9', which this memtrain does not provide",
        "missing key": "1 missing (e.g. segmentation_head.0.bias)",
    }
    for name, path in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and expected[name] in message, (name, message)


@contextlib.contextmanager
def _registered(cls):
    register(cls)
    try:
        yield cls
    finally:
        _REGISTRY.pop(cls.name, None)


class _ExtraHeadConv(Strategy):
    """Test strategy that changes the architecture: one more 1x1 convolution after the head."""

    name = "test-extra-head"
    stage = Stage.RESTRUCTURE
    summary = "adds a 1x1 convolution after the segmentation head (tests only)"

    def transform(self, model):
        model.segmentation_head.append(nn.Conv2d(1, 1, 1))
        return model


def test_architecture_strategies_are_replayed_and_others_are_not(tmp_path, trained_checkpoint):
    full = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    ckpt = {"state_dict": full["state_dict"], "memtrain": full["memtrain"]}
    # A model trained with an architecture-changing strategy: its state dict has the extra keys.
    model, _ = load_model(trained_checkpoint)
    torch.manual_seed(1)
    model = _ExtraHeadConv().transform(model)
    restructured = dict(ckpt, state_dict={f"model.{k}": v for k, v in model.state_dict().items()})
    restructured["memtrain"] = {**ckpt["memtrain"], "strategies": ["test-extra-head", "amp:bf16"]}
    torch.save(restructured, tmp_path / "restructured.ckpt")
    # Unknown here: it might change the architecture, so loading refuses.
    with pytest.raises(CheckpointError, match="trained with strategy 'test-extra-head'"):
        load_model(tmp_path / "restructured.ckpt")
    with _registered(_ExtraHeadConv):
        trained = load_trained(tmp_path / "restructured.ckpt")
    assert trained.specs == ["test-extra-head", "amp:bf16"]  # amp recorded, not applied (it keeps the keys)
    assert len(trained.model.segmentation_head) == 4
    x = torch.from_numpy(_image(64, 96))[None, None]
    with torch.no_grad():
        assert torch.equal(trained.model(x), model.eval()(x))


@pytest.mark.slow
def test_momentum_and_qat_checkpoints_from_fit_load_as_one_plain_module(tmp_path):
    """Real `fit` checkpoints of the architecture-changing strategies rebuild from their saved config alone."""
    import segmentation_models_pytorch as smp
    from torch.ao.quantization import FakeQuantizeBase

    from memtrain.config import load_yaml
    from memtrain.loop.fit import fit
    from memtrain.strategies.momentum import momentum_stages

    x = torch.from_numpy(np.stack([_image(64, 96, 0), _image(64, 96, 1)]))[:, None]
    for spec in ("momentum", "quant:qat"):
        cfg = load_yaml(ROOT / "configs" / "ci-tiny.yaml")
        cfg.strategies = [spec]
        cfg.train.max_steps = 1
        cfg.model.zero_head = False
        cfg.run.samples = 0
        cfg.memory.track = False
        cfg.run.out = str(tmp_path / spec.replace(":", "_"))
        path = fit(cfg) / "checkpoints" / "last.ckpt"  # one step: no validation yet, so no best.ckpt
        saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        trained = load_trained(path)
        model = trained.model
        assert type(model) is smp.Unet and not model.training and trained.specs[0].startswith(spec)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert set(state) == {k.removeprefix("model.") for k in saved}
        # Every trained value, observer ranges included; only the observers are switched off for inference.
        for key, value in saved.items():
            if not key.endswith(".observer_enabled"):
                assert torch.equal(state[key.removeprefix("model.")], value), (spec, key)
        if spec == "momentum":
            assert len(momentum_stages(model)) == 4
        else:
            quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
            assert quantizers and any(m.scale.numel() > 1 for m in quantizers)  # per-channel ranges learned in training, loaded
            assert all(int(m.observer_enabled[0]) == 0 and int(m.fake_quant_enabled[0]) == 1 for m in quantizers)
        # A pure function: what ran before (here a brighter batch) changes neither the state nor the output.
        with torch.no_grad():
            first = model(x)
            model(x * 3)
            again = model(x)
        assert torch.equal(first, again) and first.std() > 0
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), spec
        if spec == "quant:qat":  # the int8 model from the trained ranges: a quarter of the float file, close to it
            from memtrain.errors import StrategyError
            from memtrain.export import export_model

            result = export_model(path, "torchscript", tmp_path / "ts", size=64, int8=True)
            assert result.max_abs_diff <= 1e-4 and result.int8 is not None
            assert result.int8.bytes < 0.3 * result.int8.float_bytes and result.int8.psnr_db > 15
            with pytest.raises(StrategyError, match=r"--format onnx: .* quant:qat: .* --format torchscript"):
                export_model(path, "onnx", tmp_path / "onnx", size=64)


# ------------------------------------------------------------------ tiling


def _local_model() -> nn.Module:
    """A real conv net whose receptive field (radius 3 px) is smaller than a quarter of the overlap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid())
    with torch.no_grad():
        model[4].weight *= 30  # outputs spread over (0, 1) rather than all near 0.5
    return model.eval()


def test_blend_weights_sum_to_one_and_tiles_are_aligned():
    for n, tile, overlap in ((512, 256, 64), (416, 256, 128), (4192, 1024, 64), (96, 128, 32), (4192, 2048, 0)):
        starts = tile_starts(n, tile, overlap)
        assert starts[0] == 0 and starts[-1] == max(0, n - tile) and all(s % 32 == 0 for s in starts)
        assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))
        total = np.zeros((n, 64))
        for top, _left, w in blend_weights(starts, [0], tile, n, 64):
            total[top : top + min(tile, n)] += w
        assert np.abs(total - 1.0).max() < 1e-3, (n, tile, overlap)  # exactly 1 where two tiles meet; normalised anyway


def test_tiles_blend_exactly_for_a_model_within_the_overlap():
    img = _image(300, 250)
    enhancer = Enhancer(_local_model())
    whole, tiling = enhancer(img)
    assert tiling.tile is None and whole.std() > 0.01
    for tile, overlap in ((128, 32), (96, 48), (160, 32)):
        out, tiling = enhancer(img, tile=tile, overlap=overlap)
        assert tiling.tiles > 4
        assert np.abs(out - whole).max() < 1e-5, (tile, overlap)
    # Without overlap the tiles' zero-padded borders show up as seams.
    out, _ = enhancer(img, tile=128, overlap=0)
    assert np.abs(out - whole).max() > 1e-2


def test_tiled_unet_is_close_to_untiled_and_closer_with_larger_tiles(trained_checkpoint):
    # The U-Net's deepest features see ~400 px (ResNet18), more than any overlap: tiles
    # change the output by what the missing context contributes, less with larger tiles.
    model, _ = load_model(trained_checkpoint)
    enhancer = Enhancer(model, tiling="blend")
    img = _image(320, 256)
    whole, _ = enhancer(img)
    errors = {}
    for tile in (128, 256):
        out, tiling = enhancer(img, tile=tile, overlap=64)
        assert out.shape == whole.shape and tiling.tiles > 1
        errors[tile] = float(np.abs(out - whole).mean())
    # Measured: 256-px tiles 2.2e-3, 128-px tiles 1.6e-2, output std 3.8e-2.
    assert errors[256] < 0.15 * whole.std(), errors
    assert errors[256] < errors[128], errors


def test_tiling_follows_the_memory_budget(trained_checkpoint):
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode

    model, _ = load_model(trained_checkpoint)
    enhancer = Enhancer(model)
    # The fake-tensor estimate is what a real forward allocates as tensors.
    counter = LiveTensorBytes()
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad(), TensorBytesMode(counter):
        counter.track(x)
        out = model(x)
    del out
    assert enhancer.bytes_per_pixel() == counter.peak / 256**2
    need = enhancer.need_bytes(512, 512)
    assert need == int(SAFETY * counter.peak * 4)
    assert Enhancer(model, max_memory=need).plan(512, 512).tile is None
    tight = Enhancer(model, max_memory=need // 3, tiling="blend")
    tiling = tight.plan(512, 512)
    assert tiling.tile is not None and tiling.tile % 32 == 0 and tiling.tiles > 1 and tiling.need_bytes <= need // 3
    out, used = tight(_image(500, 500))
    assert used.tile == tiling.tile and out.shape == (500, 500)
    with pytest.raises(MemtrainError, match="not enough memory for even a"):
        Enhancer(model, max_memory=2**20, tiling="blend").plan(512, 512)
    with pytest.raises(ConfigError, match="--tile 100: expected a multiple of 32"):
        enhancer.plan(512, 512, tile=100)
    with pytest.raises(ConfigError, match="--overlap 200: expected at most half the tile"):
        tight.plan(512, 512, tile=256, overlap=200)


def test_exact_tiles_equal_whole_image_inference(trained_checkpoint):
    """The `tile` strategy's regions in eval mode: the output is whole-image inference, summed in another order."""
    model, _ = load_model(trained_checkpoint)
    enhancer = Enhancer(model)
    assert enhancer.exact and enhancer.halo() == 32
    x = torch.from_numpy(_image(256, 256, 0))[None, None]
    with enhancer.session():
        whole = enhancer.forward(x)
        assert whole.std() > 0.01  # a model whose output depends on its input (trained with --no-zero-head)
        for tile in (64, 96):  # 96: clipped tiles at the border (256 = 2 × 96 + 64)
            out = enhancer.exact_tiled(x, tile)
            # Measured max |diff| 0.0 for 64/96/128 px tiles (CPU, float32, ResNet18 checkpoint): the same convolutions.
            assert (out - whole).abs().max() <= 1e-5 * whole.abs().max(), tile
    # Through the image API, on an image whose padding (250 → 256, 200 → 224) reaches into the tiles.
    img = _image(250, 200, 2)
    ref, used = enhancer(img)
    assert used.tile is None
    out, used = enhancer(img, tile=128)
    assert used.exact and used.tiles == 2 * 2 and "4 exact tiles of 128² px, halo 32" in used.describe()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    with pytest.raises(ConfigError, match="--tiling exact: this model cannot be tiled exactly"):
        Enhancer(_local_model(), tiling="exact")
    assert not Enhancer(_local_model()).exact  # auto: blended tiles for models exact tiling does not support


def test_exact_tiles_hold_less_than_whole_image_inference_and_follow_the_budget(trained_checkpoint):
    """Real tensors counted by memtrain's tracker: exact 64 px tiles of a 256² image against the whole image."""
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode

    model, _ = load_model(trained_checkpoint)
    enhancer = Enhancer(model)
    x = torch.from_numpy(_image(256, 256))[None, None]
    peaks = {}
    for tile in (None, 128):
        counter = LiveTensorBytes()
        with torch.no_grad(), TensorBytesMode(counter):
            counter.track(x)
            out = model(x) if tile is None else enhancer.exact_tiled(x, tile)
        del out
        peaks[tile] = counter.peak
    # Measured (ResNet18): whole 24.1 MiB, 128 px tiles 11.8 MiB, 64 px tiles 8.7 MiB (fake tensors; the whole
    # ¼-resolution f2 and the middle set the floor, one tile's window runs at a time).
    assert peaks[128] < 0.6 * peaks[None], peaks
    # The planner's fake-tensor measurement is what the real tiled forward allocates.
    assert enhancer.tiled_bytes(256, 256, 128) == peaks[128]
    assert enhancer.tiled_bytes(256, 256, 64) < peaks[128]
    # A budget the whole image does not fit: the largest exact tile side that fits.
    enhancer.max_memory = budget = int(SAFETY * enhancer.tiled_bytes(256, 256, 128))
    tiling = enhancer.plan(256, 256)
    assert tiling.exact and tiling.tile == 128 and tiling.need_bytes <= budget
    enhancer.max_memory = budget - 1
    tiling = enhancer.plan(256, 256)
    assert tiling.exact and tiling.tile == 64
    # Below exact tiles' floor (the whole ¼-resolution tensors stay): auto blends, exact says why it cannot.
    enhancer.max_memory = floor = int(SAFETY * enhancer.tiled_bytes(256, 256, 64)) - 1
    tiling = enhancer.plan(256, 256, overlap=32)
    assert not tiling.exact and tiling.tile == 128 and "exact tiles need at least" in tiling.reason
    with pytest.raises(MemtrainError, match=r"not enough memory for exact tiles of a 256x256 image .* or use --tiling blend"):
        Enhancer(model, max_memory=floor, tiling="exact").plan(256, 256)


def test_amp_inference_is_close_to_float32(trained_checkpoint):
    model, _ = load_model(trained_checkpoint)
    img = _image(130, 100)
    ref, _ = Enhancer(model)(img)
    amp = Enhancer(model, amp=True)
    out, _ = amp(img)
    assert amp.precision == "bf16 autocast"
    fp32, half = Enhancer(model).bytes_per_pixel(), amp._probe(autocast=True)
    assert half < 0.6 * fp32  # 16-bit activations
    # Where the 16-bit convs run on float32 kernels (CPUs without native bf16), their float32 copies are budgeted too.
    assert amp.bytes_per_pixel() == (half + fp32 if not amp.amp.env.native_bf16 else half)
    # bf16 keeps 8 mantissa bits: measured mean |diff| 1.4e-3 for outputs of std 3.8e-2.
    assert 0 < np.abs(out - ref).mean() < 0.1 * ref.std()


# ------------------------------------------------------------------ writing outputs


def test_outputs_map_back_to_the_inputs_range_and_read_back(tmp_path):
    import tifffile
    from PIL import Image

    img = _image(90, 70)
    y = np.clip(1.2 * img**0.5, 0, 1).astype(np.float32)
    Image.fromarray((img * 50000 + 300).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((img * 250).astype(np.uint8)).save(tmp_path / "a8.png")
    tifffile.imwrite(tmp_path / "f.tif", img * 3 - 1)
    for name, dtype in (("a16.png", np.uint16), ("a8.png", np.uint8), ("f.tif", np.float32)):
        source = load_source(tmp_path / name)
        values = stored_values(source, y)
        assert values.dtype == dtype and values.min() >= source.lo and values.max() <= source.hi
        (tmp_path / f"out_{name}").write_bytes(encode(source, y, description="test"))
        back = read_image(tmp_path / f"out_{name}")
        expected = (y - y.min()) / (y.max() - y.min())
        # Rounding to the integer grid, seen through the read-back min–max normalisation.
        step = 1.0 / float(values.max() - values.min()) if dtype != np.float32 else 1e-6
        assert np.abs(back - expected).max() <= 1.01 * step, name


def test_monochrome1_dicom_stays_monochrome1_with_the_same_sense(tmp_path):
    ds = pydicom.dcmread(pydicom_test_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    source = load_source(tmp_path / "mono1.dcm")
    assert source.inverted
    y = np.clip(source.image * 0.8 + 0.1, 0, 1)
    (tmp_path / "out.dcm").write_bytes(encode(source, y, description="test"))
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.PhotometricInterpretation == "MONOCHROME1"
    # Reading it back (MONOCHROME1 inverted again) gives the model's output: bone stays bright.
    expected = (y - y.min()) / (y.max() - y.min())
    values = out.pixel_array
    assert np.abs(read_image(tmp_path / "out.dcm") - expected).max() <= 1.01 / float(values.max() - values.min())
