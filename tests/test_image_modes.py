"""One rule turns every Pillow image mode into the backbone's input (data.transforms module
docstring): high bit depths scaled by value, alpha composited over white, CMYK via Pillow, grey
replicated, RGB to ITU-R 601-2 luma. Expected pixels are computed by hand here; training's
dataset and predict give the same tensor for the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from met_lightning.data.base import InputSpec
from met_lightning.data.images import ImageListDataset, decode_error, load_image
from met_lightning.data.transforms import eval_transform, to_input_mode
from met_lightning.errors import DataError
from met_lightning.predict import read_image

RGB_SPEC = InputSpec((3, 4, 4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
GREY_SPEC = InputSpec((1, 4, 4), (0.5,), (0.25,))
WHITE = 255


def rgb(image: Image.Image) -> np.ndarray:
    out = to_input_mode(image, RGB_SPEC)
    assert out.mode == "RGB"
    return np.asarray(out)


def grey(image: Image.Image) -> np.ndarray:
    out = to_input_mode(image, GREY_SPEC)
    assert out.mode == "L"
    return np.asarray(out)


def row(values, mode: str) -> Image.Image:
    """A 1 x N image of `mode` holding `values` (tuples for multi-band modes)."""
    image = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        image.putpixel((x, 0), v)
    return image


def replicated(levels) -> np.ndarray:
    return np.repeat(np.asarray(levels, dtype=np.uint8)[None, :, None], 3, axis=2)


# ---------------------------------------------------------------------- one mode at a time
def test_l_is_replicated_to_rgb_and_kept_for_grey():
    levels = [0, 7, 128, 255]
    image = row(levels, "L")
    assert np.array_equal(rgb(image), replicated(levels))
    assert np.array_equal(grey(image), [levels])


# 16-bit value -> round(v / 257), worked out by hand: 256/257 = 0.996 -> 1, 385/257 = 1.498 -> 1,
# 386/257 = 1.502 -> 2, 32767/257 = 127.498 -> 127, 32768/257 = 127.502 -> 128,
# 65278/257 = 254 exactly, 65406/257 = 254.498 -> 254, 65407/257 = 254.502 -> 255
SIXTEEN = [0, 256, 257, 385, 386, 32767, 32768, 65278, 65406, 65407, 65535]
SIXTEEN_8BIT = [0, 1, 1, 1, 2, 127, 128, 254, 254, 255, 255]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16_bit_grey_is_scaled_by_257(mode, dtype):
    data = np.asarray(SIXTEEN, dtype=dtype).tobytes()
    image = Image.frombytes(mode, (len(SIXTEEN), 1), data)
    assert np.asarray(image).astype(int).tolist() == [SIXTEEN]  # the stored values themselves
    assert np.array_equal(rgb(image), replicated(SIXTEEN_8BIT))
    assert np.array_equal(grey(image), [SIXTEEN_8BIT])


def test_full_range_16_bit_ramp_is_not_white():
    """The issue's case: a ramp over all 65536 values came out 99.5 % pure white."""
    ramp = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    assert ramp.mode == "I;16"
    out = rgb(ramp)[..., 0]
    counts = np.bincount(out.ravel(), minlength=256)
    # round(v / 257) = n for v in [257 n - 128, 257 n + 128]: 257 values per level, and 129 at
    # the ends (0..128 -> 0, 65407..65535 -> 255)
    assert counts[0] == 129 and counts[255] == 129
    assert (counts[1:255] == 257).all()
    assert (out == 255).mean() == pytest.approx(129 / 65536)  # 0.2 % white, not 99.5 %


def test_i_32_bit_is_read_as_16_bit_values():
    # 1000 / 257 = 3.891 -> 4
    image = Image.fromarray(np.array([[0, 257, 1000, 65535]], dtype=np.int32))
    assert image.mode == "I"
    assert np.array_equal(rgb(image), replicated([0, 1, 4, 255]))


@pytest.mark.parametrize("bad", [-1, 65536, 2**31 - 1])
def test_i_outside_16_bit_is_an_error(bad):
    image = Image.fromarray(np.array([[0, bad]], dtype=np.int32))
    with pytest.raises(ValueError, match=r"read as 16-bit values 0\.\.65535.*" + str(bad)):
        rgb(image)


def test_f_is_read_as_0_to_1():
    # floor(255 v + 0.5): 0.2 -> 51, 0.5 -> 127.5 -> 128, 0.999 -> 254.745 -> 255,
    # 0.001 -> 0.255 -> 0, and -0.0015 / 1.0015 (within half a level) -> 0 / 255
    values = [0.0, 0.2, 0.5, 0.999, 0.001, 1.0, -0.0015, 1.0015]
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    assert np.array_equal(rgb(image), replicated([0, 51, 128, 255, 0, 255, 0, 255]))


@pytest.mark.parametrize("bad", [2.0, -0.5, 255.0, float("nan")])
def test_f_outside_0_1_is_an_error(bad):
    image = Image.fromarray(np.array([[0.5, bad]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"read as values in \[0, 1\]"):
        rgb(image)


def test_rgba_is_composited_over_white():
    # round((c a + 255 (255 - a)) / 255) with a = 128: (200*128 + 255*127) / 255 = 227.39 -> 227,
    # (100*128 + 255*127) / 255 = 177.2 -> 177, (0 + 255*127) / 255 = 127
    image = row([(200, 100, 0, 128), (10, 20, 30, 0), (10, 20, 30, 255)], "RGBA")
    expected = [[(227, 177, 127), (WHITE, WHITE, WHITE), (10, 20, 30)]]
    assert np.array_equal(rgb(image), np.array(expected, dtype=np.uint8))
    # grey backbone: luma of the composite, round(0.299 R + 0.587 G + 0.114 B):
    # 0.299*227 + 0.587*177 + 0.114*127 = 185.85 -> 186; 255; 0.299*10 + 0.587*20 + 0.114*30
    # = 18.15 -> 18
    assert np.array_equal(grey(image), [[186, 255, 18]])


def test_la_is_composited_over_white():
    # (0*51 + 255*204) / 255 = 204; alpha 255 keeps 100; alpha 0 -> white
    image = row([(0, 51), (100, 255), (200, 0)], "LA")
    assert np.array_equal(grey(image), [[204, 100, 255]])
    assert np.array_equal(rgb(image), replicated([204, 100, 255]))


def test_palette_with_transparency_is_composited_over_white():
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30])
    for x in range(3):
        image.putpixel((x, 0), x)
    image.info["transparency"] = 1  # palette entry 1 (blue) fully transparent
    assert np.array_equal(rgb(image), np.array([[(255, 0, 0), (255, 255, 255), (10, 20, 30)]]))
    # partial alpha per entry (PNG tRNS): entry 1 at alpha 128 -> (0*128 + 255*127) / 255 = 127
    # for R and G, (255*128 + 255*127) / 255 = 255 for B
    image.info["transparency"] = bytes([255, 128, 255])
    assert np.array_equal(rgb(image), np.array([[(255, 0, 0), (127, 127, 255), (10, 20, 30)]]))


def test_palette_without_transparency_and_bilevel():
    image = Image.new("P", (2, 1))
    image.putpalette([9, 8, 7, 1, 2, 3])
    image.putpixel((1, 0), 1)
    assert np.array_equal(rgb(image), np.array([[(9, 8, 7), (1, 2, 3)]], dtype=np.uint8))
    assert np.array_equal(rgb(row([0, 1], "1")), replicated([0, 255]))


def test_cmyk_via_pillow():
    pixels = [(0, 255, 0, 0), (51, 0, 0, 0), (0, 0, 0, 51), (100, 50, 20, 60), (0, 0, 0, 255)]

    def by_hand(c, m, y, k):  # R = round((255 - C)(255 - K) / 255), likewise G / M, B / Y
        return tuple(int((255 - v) * (255 - k) / 255 + 0.5) for v in (c, m, y))

    # e.g. (100, 50, 20, 60): 155*195/255 = 118.5 -> 119, 205*195/255 = 156.8 -> 157,
    # 235*195/255 = 179.7 -> 180
    expected = [by_hand(*p) for p in pixels]
    assert expected[3] == (119, 157, 180) and expected[0] == (255, 0, 255)
    assert np.array_equal(rgb(row(pixels, "CMYK")), np.array([expected], dtype=np.uint8))


def test_rgb_to_grey_by_itu_r_601_2_luma():
    # round(0.299 R + 0.587 G + 0.114 B): 76.2 -> 76, 149.7 -> 150, 29.1 -> 29,
    # 2.99 + 117.4 + 3.42 = 123.8 -> 124
    image = row([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 200, 30)], "RGB")
    assert np.array_equal(grey(image), [[76, 150, 29, 124]])
    assert np.array_equal(rgb(image), np.asarray(image))  # RGB is kept as it is


def test_transparent_key_colour_of_rgb_and_16_bit_grey():
    image = row([(1, 2, 3), (9, 9, 9)], "RGB")
    image.info["transparency"] = (9, 9, 9)  # PNG tRNS of a truecolour image
    assert np.array_equal(rgb(image), np.array([[(1, 2, 3), (255, 255, 255)]], dtype=np.uint8))
    sixteen = Image.frombytes("I;16", (2, 1), np.array([0, 5000], "<u2").tobytes())
    sixteen.info["transparency"] = 0
    assert np.array_equal(grey(sixteen), [[255, 19]])  # 5000 / 257 = 19.46 -> 19


# ---------------------------------------------------------------------- files: train = predict
def _write_files(folder):
    """(file, the RGB input expected by hand) for lossless files of each mode."""
    folder.mkdir()
    ramp = np.arange(0, 65536, 4369, dtype=np.uint16).reshape(4, 4)  # 0, 4369, ... 65535
    files = {}
    Image.fromarray(ramp).save(folder / "grey16.png")
    files["grey16.png"] = replicated(((2 * ramp.astype(int) + 257) // 514).ravel()).reshape(
        4, 4, 3
    )  # 4369 = 17 * 257, so the levels are 0, 17, ..., 255
    assert files["grey16.png"][0, 1, 0] == 17
    Image.fromarray(ramp.astype(np.int32) * 1).save(folder / "int32.tif")
    files["int32.tif"] = files["grey16.png"]
    Image.fromarray((ramp / 65535).astype(np.float32)).save(folder / "float.tif")
    files["float.tif"] = files["grey16.png"]  # v / 65535 * 255 + 0.5 = 17 n + 0.5 -> 17 n
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba).save(folder / "rgba.png")
    files["rgba.png"] = np.broadcast_to(np.array([227, 127, 127], np.uint8), (4, 4, 3))
    la = np.stack([np.zeros((4, 4)), np.full((4, 4), 51)], axis=-1).astype(np.uint8)
    Image.fromarray(la).save(folder / "la.png")
    files["la.png"] = np.full((4, 4, 3), 204, np.uint8)
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255])
    pal.putpixel((0, 0), 1)
    pal.save(folder / "palette.png", transparency=1)
    files["palette.png"] = np.broadcast_to(np.array([255, 0, 0], np.uint8), (4, 4, 3)).copy()
    files["palette.png"][0, 0] = 255
    Image.new("CMYK", (4, 4), (100, 50, 20, 60)).save(folder / "cmyk.tif")
    files["cmyk.tif"] = np.broadcast_to(np.array([119, 157, 180], np.uint8), (4, 4, 3))
    return files


def test_dataset_and_predict_give_the_same_tensor(tmp_path):
    files = _write_files(tmp_path / "images")
    transform = eval_transform(RGB_SPEC, "backbone")
    samples = [(tmp_path / "images" / name, 0) for name in files]
    dataset = ImageListDataset(samples, RGB_SPEC, transform, "the test list")
    for index, (name, expected) in enumerate(files.items()):
        path = tmp_path / "images" / name
        assert decode_error(path) is None
        assert np.array_equal(np.asarray(load_image(path, RGB_SPEC, "x")), expected), name
        from_predict = read_image(path, RGB_SPEC, transform)
        from_dataset, _ = dataset[index]
        assert torch.equal(from_predict, from_dataset), name
        by_hand = transform(Image.fromarray(np.ascontiguousarray(expected)))
        assert torch.equal(from_predict, by_hand), name


def test_out_of_range_file_is_named_and_skippable(tmp_path):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32)).save(path)
    assert "[0, 1]" in decode_error(path)  # data.skip_bad_images / predict skip_bad_images drop it
    with pytest.raises(DataError, match=r"hdr\.tif.*read as values in \[0, 1\]"):
        load_image(path, RGB_SPEC, "the test list")
