"""Image preprocessing equals transformers' LlavaNextImageProcessorPil bit for bit; bad inputs raise ImageError."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mlx_llava_next import anyres
from mlx_llava_next.errors import CheckpointError, ImageError
from mlx_llava_next.image_processing import ImageProcessor, load_image

hf_image_processing = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")

LLAVA_HF_CONFIG = {
    "aspect_ratio_setting": "anyres",  # present in llava-hf configs, ignored by both implementations
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
HF_KEYS = ("crop_size", "image_grid_pinpoints", "image_mean", "image_std", "resample", "rescale_factor", "size")


def hf_processor(**overrides):
    config = {k: LLAVA_HF_CONFIG[k] for k in HF_KEYS} | overrides
    return hf_image_processing.LlavaNextImageProcessorPil(**config)


def assert_same(ours, hf_out, label=""):
    hf_pixels, hf_sizes = hf_out["pixel_values"], hf_out["image_sizes"]
    assert ours["pixel_values"].dtype == np.float32 and ours["image_sizes"].dtype == np.int64
    assert ours["pixel_values"].shape == hf_pixels.shape, label
    np.testing.assert_array_equal(ours["image_sizes"], hf_sizes, err_msg=label)
    diff = float(np.abs(ours["pixel_values"] - hf_pixels).max())
    assert diff <= 1e-6, f"{label}: max |diff| {diff}"
    return diff


# ------------------------------------------------------------------------------------------------------------------
# Test images (fixed seeds)


def smooth(h, w, seed, channels=3):
    """Photo-like: low-frequency gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [np.sin(x / (w / (2 + c)) + c) * np.cos(y / (h / (1.5 + c))) for c in range(channels)]
    img = 127.5 + 100 * np.stack(planes, -1) + rng.normal(0, 8, (h, w, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def photo(h, w, seed):
    """A large photo-like image made cheaply: a smooth image upscaled, with per-pixel grain."""
    base = Image.fromarray(smooth(h // 10, w // 10, seed)).resize((w, h), Image.Resampling.BILINEAR)
    grain = np.random.default_rng(seed).integers(0, 16, (h, w, 1), dtype=np.uint8)
    pixels = np.asarray(base)
    return Image.fromarray(pixels - np.minimum(pixels, grain))


def noise(h, w, seed, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def png_roundtrip(image, **save_kwargs):
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_kwargs)
    return Image.open(io.BytesIO(buf.getvalue()))


def palette_with_trns():
    rgb = Image.fromarray(smooth(256, 256, 7))
    pal = rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    image = png_roundtrip(pal, transparency=5)
    assert image.mode == "P" and image.info.get("transparency") is not None
    return image


def i16_image():
    values = np.random.default_rng(8).integers(0, 1024, (240, 320)).astype(np.uint16)  # many > 255: clipped
    image = png_roundtrip(Image.fromarray(values))
    assert image.mode.startswith("I;16")
    return image


def rgba(h, w, seed):
    data = noise(h, w, seed, 4)
    data[: h // 3, :, 3] = 0  # fully transparent band
    return Image.fromarray(data, "RGBA")


def _skimage(name):
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()


CASES = {
    "rgb_300x400": lambda: Image.fromarray(noise(300, 400, 1)),  # 449 columns: float ceil
    "rgb_1500x2000": lambda: Image.fromarray(smooth(1500, 2000, 2)),  # 505 rows: float ceil
    "rgb_2x1000": lambda: Image.fromarray(noise(2, 1000, 3)),
    "rgb_1000x200": lambda: Image.fromarray(smooth(1000, 200, 4)),
    "rgb_200x1000": lambda: Image.fromarray(smooth(200, 1000, 5)),
    "rgb_19x19": lambda: Image.fromarray(noise(19, 19, 6)),
    "rgb_336x336": lambda: Image.fromarray(smooth(336, 336, 9)),
    "rgb_899x1024": lambda: Image.fromarray(smooth(899, 1024, 10)),
    "rgb_673x337": lambda: Image.fromarray(noise(673, 337, 11)),
    "photo_3000x4000": lambda: photo(3000, 4000, 12),
    "L_300x500": lambda: Image.fromarray(smooth(300, 500, 13, 1)[..., 0]),
    "LA_130x257": lambda: Image.fromarray(noise(130, 257, 14, 2), "LA"),
    "RGBA_300x400": lambda: rgba(300, 400, 15),
    "RGBA_720x480": lambda: rgba(720, 480, 16),
    "P_256x384": lambda: Image.fromarray(smooth(256, 384, 17)).convert("P"),
    "P_tRNS_256x256": palette_with_trns,
    "L_tRNS_100x150": lambda: png_roundtrip(Image.fromarray(noise(100, 150, 18, 1)[..., 0]), transparency=7),
    "1_120x90": lambda: Image.fromarray(noise(120, 90, 19, 1)[..., 0]).convert("1"),
    "I16_240x320": i16_image,
    "CMYK_333x500": lambda: Image.fromarray(noise(333, 500, 20, 4), "CMYK"),
    "jpeg_480x640": lambda: Image.open(io.BytesIO(_jpeg_bytes(smooth(480, 640, 21)))),
    "np_hwc_480x640": lambda: smooth(480, 640, 22),
    "np_chw_500x316": lambda: np.ascontiguousarray(smooth(500, 316, 23).transpose(2, 0, 1)),
    "np_hwc4_200x300": lambda: noise(200, 300, 24, 4),
    "np_chw4_250x90": lambda: np.ascontiguousarray(noise(250, 90, 25, 4).transpose(2, 0, 1)),
    "np_gray_hw1_page": lambda: _skimage("page")[..., None],
    "np_gray_1hw_77x50": lambda: noise(77, 50, 26, 1).transpose(2, 0, 1),
    "skimage_page_L": lambda: Image.fromarray(_skimage("page")),
    "skimage_astronaut": lambda: _skimage("astronaut"),
}


def _jpeg_bytes(array, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf():
    return hf_processor()


@pytest.fixture(scope="module")
def ours():
    return ImageProcessor.from_dict(LLAVA_HF_CONFIG)


MAX_DIFFS = {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name, hf, ours):
    image = CASES[name]()
    MAX_DIFFS[name] = assert_same(ours(image), hf(image, return_tensors="np"), name)
    assert MAX_DIFFS[name] == 0.0, f"{name}: not bit-exact ({MAX_DIFFS[name]})"


def test_batch_zero_pads_patch_axis(hf, ours):
    images = [Image.fromarray(noise(300, 400, 30)), Image.fromarray(smooth(1500, 2000, 31)),
              smooth(1000, 200, 32), rgba(50, 60, 33)]
    out = ours(images)
    assert_same(out, hf(images, return_tensors="np"), "batch")
    nested = [images[:2], images[2:]]  # one list per prompt flattens in order
    assert_same(ours(nested), hf(nested, return_tensors="np"), "nested batch")
    counts = [anyres.num_patches(tuple(s), ours.image_grid_pinpoints, ours.tile_size) for s in out["image_sizes"]]
    assert counts == [3, 5, 4, 3] and out["pixel_values"].shape[:2] == (4, 5)
    for i, n in enumerate(counts):
        assert np.all(out["pixel_values"][i, n:] == 0.0)
        assert np.all(out["pixel_values"][i, :n].any(axis=(1, 2, 3)))

    unpadded = ours(images, do_pad=False)["pixel_values"]
    hf_unpadded = hf(images, do_pad=False)["pixel_values"]
    assert [p.shape[0] for p in unpadded] == counts
    for mine, theirs in zip(unpadded, hf_unpadded):
        np.testing.assert_array_equal(mine, theirs)


def test_4d_array_is_a_batch(hf, ours):
    batch = np.stack([noise(120, 160, 40), noise(120, 160, 41)])
    assert_same(ours(batch), hf(batch, return_tensors="np"), "4-D")


def test_path_inputs_match_transformers_load_image(tmp_path, hf, ours):
    # transformers loads str inputs with image_utils.load_image: EXIF transpose + convert("RGB") (alpha dropped)
    rgba_path, jpeg_path = tmp_path / "rgba.png", tmp_path / "rotated.jpg"
    rgba(90, 140, 50).save(rgba_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 270
    jpeg_path.write_bytes(_jpeg_bytes(smooth(100, 180, 51), exif=exif.tobytes()))
    for path in (rgba_path, jpeg_path):
        assert_same(ours(str(path)), hf(str(path), return_tensors="np"), path.name)
        assert_same(ours(path), hf(str(path), return_tensors="np"), path.name)
    assert tuple(ours(jpeg_path)["image_sizes"][0]) == (180, 100)
    assert load_image(jpeg_path).size == (100, 180) and load_image(rgba_path).mode == "RGB"


# ------------------------------------------------------------------------------------------------------------------
# Non-default configurations (generic per-tile resize / centre-crop path)

GENERIC_CONFIGS = {
    "crop18_se20_small_pinpoints": dict(crop_size={"height": 18, "width": 18}, size={"shortest_edge": 20},
                                        image_grid_pinpoints=[[36, 18], [18, 36], [36, 36]]),
    # the HF unit-test setting: 336-multiples cut into 18-tiles leave 12-pixel edge tiles
    "crop18_default_pinpoints": dict(crop_size={"height": 18, "width": 18}, size={"shortest_edge": 18}),
    "crop_larger_than_size": dict(crop_size={"height": 20, "width": 20}, size={"shortest_edge": 16},
                                  image_grid_pinpoints=[[40, 20], [20, 40], [40, 40]]),
    "height_width_size": dict(crop_size={"height": 18, "width": 16}, size={"height": 30, "width": 24},
                              image_grid_pinpoints=[[36, 18], [18, 36], [36, 36]]),
}


@pytest.mark.parametrize("name", sorted(GENERIC_CONFIGS))
def test_generic_configs_match_transformers(name):
    config = GENERIC_CONFIGS[name]
    hf, ours = hf_processor(**config), ImageProcessor.from_dict(LLAVA_HF_CONFIG | config)
    images = [Image.fromarray(smooth(400, 400, 60)), Image.fromarray(noise(25, 61, 61)), noise(7, 5, 62)]
    out = ours(images)
    assert_same(out, hf(images, return_tensors="np"), name)
    for i, size in enumerate(out["image_sizes"]):
        n = ours.num_patches(size)
        assert not np.any(out["pixel_values"][i, n:]) and np.all(out["pixel_values"][i, :n].any(axis=(1, 2, 3)))
    if name == "crop18_default_pinpoints":
        assert out["pixel_values"].shape[1] == 1445  # as the transformers test expects for 400x400


def test_config_loading(tmp_path):
    # llava-hf preprocessor_config.json with int sizes: size -> shortest edge, crop -> square
    legacy = LLAVA_HF_CONFIG | {"size": 20, "crop_size": 18}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 20} and ours.crop_size == {"height": 18, "width": 18}
    assert ours.tile_size == 18 and ours.base_size == (20, 20)
    hf = hf_image_processing.LlavaNextImageProcessorPil.from_pretrained(tmp_path)
    image = noise(50, 70, 70)
    assert_same(ours(image), hf(image, return_tensors="np"), "legacy config")

    # transformers 5 save_pretrained nests the image processor in processor_config.json; that one wins
    nested = {"image_processor": LLAVA_HF_CONFIG | {"crop_size": {"height": 24, "width": 24}}, "patch_size": 14}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert ImageProcessor.from_pretrained(tmp_path).tile_size == 24
    assert hf_image_processing.LlavaNextImageProcessorPil.from_pretrained(tmp_path).crop_size.height == 24

    # an old processor_config.json without image_processor falls back to preprocessor_config.json
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 14}))
    assert ImageProcessor.from_pretrained(tmp_path).tile_size == 18

    assert ImageProcessor() == ImageProcessor.from_dict(LLAVA_HF_CONFIG)
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------------------
# Token counts: anyres.num_image_tokens equals LlavaNextProcessor


@pytest.fixture(scope="module")
def hf_full_processor(hf):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<image>": 1, "hello": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        additional_special_tokens=["<image>"])
    return LlavaNextProcessor(image_processor=hf, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def token_sizes():
    fixed = [(1, 1), (2, 2), (5, 3), (17, 17), (300, 100), (100, 300), (2, 1000), (1000, 2), (336, 336), (337, 336),
             (672, 672), (899, 1024), (480, 640), (640, 480), (200, 1000), (1000, 200), (500, 316), (673, 337),
             (336, 1344), (1500, 2000), (300, 400), (1008, 336), (336, 1008), (4000, 3000)]
    rng = np.random.default_rng(80)
    randoms = [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(30)]
    skinny = [tuple(int(v) for v in rng.permutation([rng.integers(1, 40), rng.integers(200, 3000)])) for _ in range(10)]
    return fixed + randoms + skinny


def test_token_counts_match_transformers(hf_full_processor, ours):
    sizes = token_sizes()
    assert len(sizes) >= 40
    theirs = hf_full_processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    mine = [anyres.num_image_tokens(s, ours.image_grid_pinpoints, ours.tile_size, 14, "default", 1) for s in sizes]
    assert mine == theirs
    assert mine == [ours.num_image_tokens(s, 14) for s in sizes]
    assert dict(zip(sizes, mine))[(300, 100)] == 792 and dict(zip(sizes, mine))[(2, 1000)] == 576


@pytest.mark.parametrize("size", [(17, 17), (300, 100), (100, 300), (2, 1000), (336, 336), (899, 1024)])
def test_token_count_through_processor_call(hf_full_processor, ours, size):
    image = Image.fromarray(noise(*size, 90))
    out = hf_full_processor(images=[image], text="hello <image> hello", return_tensors="np")
    expanded = int((out["input_ids"] == hf_full_processor.image_token_id).sum())
    assert ours.num_image_tokens(size) == expanded


# ------------------------------------------------------------------------------------------------------------------
# Bad input


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _assert_image_error(source, fragment, match=None):
    for call in (load_image, ImageProcessor()):
        with pytest.raises(ImageError) as info:
            call(source)
        assert fragment in str(info.value), str(info.value)
        if match:
            assert match in str(info.value).lower(), str(info.value)


def test_missing_file(tmp_path):
    _assert_image_error(str(tmp_path / "nope.png"), "nope.png", "not found")
    _assert_image_error(tmp_path / "nope.png", "nope.png", "not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_image_error(path, "empty.jpg", "empty")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    _assert_image_error(path, "notes.png", "not a recognised image")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file(tmp_path, fmt):
    data = _png_bytes(noise(200, 300, 100)) if fmt == "png" else _jpeg_bytes(noise(200, 300, 100))
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _assert_image_error(path, f"cut.{fmt}")
    # a lazily opened truncated image handed over as a PIL object fails with ImageError too
    with pytest.raises(ImageError, match=f"cut.{fmt}"):
        ImageProcessor()(Image.open(path))


@pytest.mark.parametrize("pixels", [100 * 100, 40 * 40])  # > 2x the limit (Pillow error), 1x-2x (Pillow warning)
def test_decompression_bomb(tmp_path, monkeypatch, pixels):
    side = int(pixels**0.5)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(np.zeros((side, side, 3), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _assert_image_error(path, "bomb.png", "too large")
    _assert_image_error(path.read_bytes(), "<bytes>")


def test_bad_arrays_and_modes():
    _assert_image_error(noise(20, 30, 0, 1)[..., 0], "image", "3-d image array")  # 2-D, like transformers rejects
    _assert_image_error(noise(20, 30, 0, 2), "image", "channel axis")
    _assert_image_error(noise(20, 30, 0).astype(np.float32) / 255, "image", "uint8")
    for call in (load_image, ImageProcessor()):
        with pytest.raises(ImageError, match="La"):
            call(Image.new("La", (10, 10)))
    with pytest.raises(ImageError, match="empty image"):
        ImageProcessor()(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError):
        ImageProcessor()([])
    with pytest.raises(ImageError):
        ImageProcessor()(object())
