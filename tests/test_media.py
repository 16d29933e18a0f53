"""model/media.py: reading, writing and the release's preprocessing. All media is generated in tmp dirs."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lance_rl.model import media
from lance_rl.model.media import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    bucket_resize,
    bucket_size,
    buckets,
    divisible_crop,
    read_image,
    read_media,
    read_video,
    sample_frame_indices,
    to_uint8,
    vae_tensor,
    vit_tensor,
    write_gif,
    write_mp4,
    write_png,
)


def ramp_frames(t, h, w):
    """Smooth frames whose brightness encodes the frame index (survives lossy codecs)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.zeros_like(x)], -1)
    frames = np.repeat(base[None], t, 0).astype(np.int32)
    frames[..., 2] = (np.arange(t) * 255 // max(t - 1, 1))[:, None, None]
    return frames.astype(np.uint8)


def blank(h, w, t=1):
    return np.zeros((t, h, w, 3), np.uint8)


# ---------------------------------------------------------------------------------------------- buckets

# (area side, input h, input w, bucket (h, w), multiple for the divisible crop, after the crop): spec 3.6 examples.
SPEC_EXAMPLES = [
    (640, 90, 160, (480, 848), 16, (480, 848)),  # VAE 640, 16:9
    (640, 100, 100, (640, 640), 16, (640, 640)),  # VAE 640, 1:1
    (768, 100, 100, (768, 768), 16, (768, 768)),  # VAE 768, 1:1
    (768, 90, 160, (576, 1024), 16, (576, 1024)),  # VAE 768, 16:9
    (768, 90, 210, (496, 1152), 16, (496, 1152)),  # VAE 768, 21:9
    (616, 90, 160, (464, 832), 28, (448, 812)),  # ViT 616, 16:9
    (672, 100, 100, (672, 672), 28, (672, 672)),  # ViT 672, 1:1
]


@pytest.mark.parametrize("side,h,w,bucket,multiple,cropped", SPEC_EXAMPLES)
def test_spec_bucket_examples(side, h, w, bucket, multiple, cropped):
    assert bucket_size(h, w, side) == bucket
    out = divisible_crop(bucket_resize(blank(h, w), side), multiple)
    assert out.shape == (1, *cropped, 3)


def test_presets_through_tensors():
    frame = blank(90, 160)
    assert vae_tensor(frame, "video_480p").shape == (3, 1, 480, 848)
    assert vit_tensor(frame, "video_480p").shape == (3, 2, 448, 812)
    assert vae_tensor(blank(100, 100), "image_768res").shape == (3, 1, 768, 768)
    assert vit_tensor(blank(100, 100), "image_768res").shape == (3, 2, 672, 672)
    assert media.RESOLUTIONS["video_192p"] == media.RESOLUTIONS["image_256res"] == (256, 224)
    assert media.RESOLUTIONS["image_512res"] == (512, 448)
    assert media.RESOLUTIONS["video_360p"] == (480, 476)


# video_480p VAE buckets (area 640^2), from the release's two-candidate rounding formula.
BUCKETS_640 = {
    "21:9": (416, 976),
    "16:9": (480, 848),
    "4:3": (560, 752),
    "1:1": (640, 640),
    "3:4": (752, 560),
    "9:16": (848, 480),
}


def test_bucket_table_640():
    assert buckets(640) == BUCKETS_640


@pytest.mark.parametrize("name", list(BUCKETS_640))
def test_each_aspect_ratio(name):
    a, b = (int(v) for v in name.split(":"))
    h, w = 12 * b, 12 * a  # an input of exactly the nominal aspect
    bh, bw = BUCKETS_640[name]
    assert bucket_size(h, w, 640) == (bh, bw)
    assert bh % 16 == 0 and bw % 16 == 0
    assert abs(bh * bw / 640**2 - 1) < 0.05
    x = vae_tensor(blank(h, w), 640)
    assert x.shape == (3, 1, bh, bw)
    v = vit_tensor(blank(h, w), "video_480p")
    assert v.shape[2] % 28 == 0 and v.shape[3] % 28 == 0


def test_bucket_resize_center_crops_to_bucket_aspect():
    # 64x72 is nearest the 1:1 bucket: the crop keeps the central 64 columns, dropping 4 red ones each side.
    frame = np.zeros((1, 64, 72, 3), np.uint8)
    frame[..., 1] = 200
    frame[:, :, :4] = frame[:, :, -4:] = (255, 0, 0)
    out = bucket_resize(frame, 256)
    assert out.shape == (1, 256, 256, 3)
    assert np.abs(out.astype(int) - (0, 200, 0)).max() <= 2


@pytest.mark.parametrize("h,w", [(480, 640), (500, 333), (37, 91), (64, 72), (90, 210), (101, 99)])
def test_bucket_resize_matches_release_transform(h, w):
    """Same pixels as the release's torchvision RandomResizedCrop(scale=(1, 1), ratio=(r, r)) + PIL bicubic.

    Where the input already has the bucket's aspect, the release picks a random offset of at most a pixel;
    our centred choice must be one of its outcomes.
    """
    tv = pytest.importorskip("torchvision.transforms")
    frame = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    bh, bw = bucket_size(h, w, 256)
    crop = tv.RandomResizedCrop((bh, bw), scale=(1, 1), ratio=(bw / bh,) * 2, interpolation=tv.InterpolationMode.BICUBIC)
    ours = bucket_resize(frame, 256)[0]
    outcomes = []
    for seed in range(8):
        torch.manual_seed(seed)
        outcomes.append(np.asarray(crop(Image.fromarray(frame))))
    assert any(np.array_equal(ours, o) for o in outcomes)


def test_divisible_crop_is_centered():
    frame = np.zeros((1, 30, 45, 3), np.uint8)
    frame[0, 7, 6] = 255  # torchvision offsets: top round(14/2)=7, left round(13/2)=6 (half to even)
    out = divisible_crop(frame, 16)
    assert out.shape == (1, 16, 32, 3)
    assert out[0, 0, 0, 0] == 255 and out.sum() == 3 * 255


# ---------------------------------------------------------------------------------------------- images


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    img = read_image(p)
    assert img.dtype == np.uint8 and img.shape == (20, 20, 3)
    assert img[0, 0].tolist() == [255, 255, 255]
    assert img[0, 1].tolist() == [255, 0, 0]
    assert abs(int(img[0, 2, 0]) - 127) <= 1


def test_la_palette_and_gray(tmp_path):
    la = np.zeros((20, 20, 2), np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png")[0, 0].tolist() == [255, 255, 255]

    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    assert read_image(tmp_path / "p.png")[5, 5].tolist() == [255, 255, 255]

    Image.fromarray(np.full((20, 20), 77, np.uint8), "L").save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (20, 20, 3) and (g == 77).all()


def test_png_round_trip_exact(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    write_png(frame, tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), frame)
    frames, fps = read_media((tmp_path / "x.png").read_bytes())
    assert fps is None and frames.shape == (1, 33, 47, 3)
    np.testing.assert_array_equal(frames[0], frame)


# ---------------------------------------------------------------------------------------------- videos


def test_mp4_round_trip(tmp_path):
    frames = ramp_frames(9, 48, 64)
    p = tmp_path / "v.mp4"
    write_mp4(frames, p, fps=12)
    out, fps = read_video(p, fps=12, frame_rule=None)
    assert out.shape == (9, 48, 64, 3) and out.dtype == np.uint8
    assert fps == pytest.approx(12)
    assert np.abs(out.astype(int) - frames).mean() < 4
    # the container says H.264 / yuv420p, so ordinary players take it
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
    # same from raw bytes (parquet rows), via the content sniffing dispatcher
    out2, _ = read_media(p.read_bytes(), frame_rule=None)
    assert out2.shape == out.shape


def test_mp4_odd_size_padded_to_even(tmp_path):
    write_mp4(ramp_frames(5, 47, 63), tmp_path / "odd.mp4", fps=12)
    out, _ = read_video(tmp_path / "odd.mp4", frame_rule=None)
    assert out.shape == (5, 48, 64, 3)


def test_gif_round_trip(tmp_path):
    frames = ramp_frames(9, 48, 64)
    frames[4] = frames[3]  # identical consecutive frames must not be merged
    p = tmp_path / "v.gif"
    write_gif(frames, p, fps=12)
    out, _ = read_video(p, fps=12, frame_rule=None)
    assert out.shape == (9, 48, 64, 3)
    assert np.abs(out.astype(int) - frames).mean() < 4
    out2, fps = read_media(p, frame_rule=None)
    assert fps is not None and out2.shape == out.shape


def test_webm_read(tmp_path):
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("no VP9 encoder in this PyAV build")
    p = tmp_path / "v.webm"
    with av.open(str(p), "w", format="webm") as c:
        s = c.add_stream("libvpx-vp9", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in ramp_frames(13, 48, 64):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    out, _ = read_media(p, frame_rule=None)
    assert out.shape == (13, 48, 64, 3)


def test_frame_index_rule():
    # n = round(min(total / fps, max_s) * 12), "4k+1" = largest 4k+1 <= n (release: n % 4 == 0 -> n - 3)
    assert len(sample_frame_indices(12, 12, frame_rule="4k+1")) == 9
    assert len(sample_frame_indices(13, 12, frame_rule="4k+1")) == 13
    assert len(sample_frame_indices(15, 12, frame_rule="4k+1")) == 13
    assert len(sample_frame_indices(15, 12, frame_rule="even")) == 14
    assert len(sample_frame_indices(15, 12, frame_rule=None)) == 15
    # 29.97 fps rounds to 30 as decord's avg fps does in the release; 20 s is capped to 6 s -> 72 -> 69 frames
    idx = sample_frame_indices(600, 30, max_seconds=6.0, frame_rule="4k+1")
    assert len(idx) == 69 and idx[0] == 0 and idx[-1] == 599  # spans the whole clip, as the release does
    np.testing.assert_array_equal(sample_frame_indices(9, 12, frame_rule=None), np.arange(9))
    assert len(sample_frame_indices(1, 12, frame_rule="4k+1")) == 1  # never empty
    with pytest.raises(ValueError):
        sample_frame_indices(9, 12, frame_rule="4k")


def test_read_video_frame_rules_and_max_seconds(tmp_path):
    p = tmp_path / "v.mp4"
    frames = ramp_frames(30, 48, 64)  # 2.5 s at 12 fps
    write_mp4(frames, p, fps=12)
    v, fps = read_video(p, frame_rule="4k+1")
    assert len(v) == 29 and (len(v) - 1) % 4 == 0
    assert fps == pytest.approx(29 / 2.5)
    v, _ = read_video(p, frame_rule="even")
    assert len(v) == 30
    v, _ = read_video(p, fps=6, frame_rule="even")
    assert len(v) == 14  # round(2.5 * 6) = 15 -> 14
    v, fps = read_video(p, max_seconds=1.0, frame_rule="4k+1")
    assert len(v) == 9  # round(1 * 12) = 12 -> 9
    # ... spread over the whole clip: the last sample is the last frame (blue channel encodes the index)
    assert abs(int(v[-1, 24, 32, 2]) - 255) < 8 and int(v[0, 24, 32, 2]) < 8


# ---------------------------------------------------------------------------------------------- errors


def test_corrupt_file(tmp_path):
    p = tmp_path / "broken.mp4"
    p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(MediaError, match="broken.mp4"):
        read_video(p)
    with pytest.raises(MediaError, match="broken.mp4"):
        read_media(p)
    q = tmp_path / "broken.png"
    q.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(MediaError, match="broken.png.*corrupt"):
        read_image(q)
    with pytest.raises(MediaError, match="broken.png"):
        read_media(q)


def test_truncated_mp4(tmp_path):
    p = tmp_path / "cut.mp4"
    write_mp4(ramp_frames(9, 48, 64), p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(MediaError, match="cut.mp4"):
        read_video(p)


def test_zero_frame_video(tmp_path):
    # a Matroska file cut just after its first Cluster header: the stream exists, no frame decodes
    full = tmp_path / "full.mkv"
    with av.open(str(full), "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in ramp_frames(3, 48, 64):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    data = full.read_bytes()
    p = tmp_path / "noframes.mkv"
    p.write_bytes(data[: data.find(bytes.fromhex("1F43B675")) + 12])
    with pytest.raises(MediaError, match="noframes.mkv.*zero decodable frames"):
        read_media(p)
    with pytest.raises(ValueError):
        write_mp4(np.zeros((0, 48, 64, 3), np.uint8), tmp_path / "none.mp4")


def test_zero_byte_file(tmp_path):
    for name in ("empty.png", "empty.mp4"):
        p = tmp_path / name
        p.write_bytes(b"")
        for reader in (read_image, read_video, read_media):
            with pytest.raises(MediaError, match=f"{name}.*empty"):
                reader(p)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(MediaError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a picture")
    with pytest.raises(MediaError, match="notes.txt.*unknown media format"):
        read_media(p)
    with pytest.raises(MediaError, match="unknown media format"):
        read_media(b"hello")


def test_too_small(tmp_path):
    p = tmp_path / "tiny.png"
    write_png(np.zeros((8, 40, 3), np.uint8), p)
    with pytest.raises(MediaError, match="tiny.png.*too small"):
        read_image(p)
    with pytest.raises(MediaError, match="tiny.png.*too small"):
        read_media(p)
    v = tmp_path / "tiny.mp4"
    write_mp4(np.zeros((5, 8, 40, 3), np.uint8), v)
    with pytest.raises(MediaError, match="tiny.mp4.*too small"):
        read_video(v)
    assert read_image(p, min_side=1).shape == (8, 40, 3)  # callers may lower the bound
    assert issubclass(MediaError, ValueError)


# ---------------------------------------------------------------------------------------------- tensors


def test_vit_tensor_frames():
    img = np.random.default_rng(0).integers(0, 256, (1, 56, 56, 3), dtype=np.uint8)
    x = vit_tensor(img, 224)
    assert x.shape == (3, 2, 224, 224)
    torch.testing.assert_close(x[:, 0], x[:, 1])
    vid = ramp_frames(3, 56, 56)
    x = vit_tensor(vid, 224)
    assert x.shape[1] == 4
    torch.testing.assert_close(x[:, 3], x[:, 2])
    assert not torch.equal(x[:, 1], x[:, 2])
    assert vit_tensor(ramp_frames(4, 56, 56), 224).shape[1] == 4
    # CLIP normalisation: white -> (1 - mean) / std per channel
    white = vit_tensor(np.full((1, 56, 56, 3), 255, np.uint8), "image_256res")
    expect = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white[:, 0, 0, 0], expect)


def test_vae_tensor_range_and_inverse():
    frames = np.random.default_rng(1).integers(0, 256, (5, 60, 100, 3), dtype=np.uint8)
    frames[0] = 0
    frames[1] = 255
    x = vae_tensor(frames, "image_256res")
    assert x.dtype == torch.float32 and x.shape[0] == 3 and x.shape[1] == 5
    assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0
    assert x.min() >= -1 and x.max() <= 1
    assert x[:, 0].eq(-1).all() and x[:, 1].eq(1).all()
    back = to_uint8(x)
    assert back.dtype == np.uint8 and back.shape == (5, x.shape[2], x.shape[3], 3)
    ref = divisible_crop(bucket_resize(frames, 256), 16)
    assert np.abs(back.astype(int) - ref).max() <= 1


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(3, 1, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even -> 128
    assert to_uint8(torch.zeros(3, 4, 4)).shape == (1, 4, 4, 3)  # a single image [3, H, W]
