"""Input files for the seventh round's new models (benchmarks/ANYMODEL_RESULTS.md, sweep7 lane).

python benchmarks/sweep7_data.py OUTDIR [ocrdet dnsmos pesto]   -> OUTDIR/NAME_{calib,eval}.npz
Photos are scikit-image's (unseen_data's crops; calibration and eval use different photos) with lines of real
text (this machine's /usr/share/doc files) drawn on them in DejaVu fonts; speech is espeak-ng's in 8 voices
(unseen_data.speech) mixed with noise at 0-30 dB SNR. Nothing is downloaded.
"""
from __future__ import annotations

import glob
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from unseen_data import CALIB_PHOTOS, EVAL_PHOTOS, SENTENCES, VOICES, main, photos, speech  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def text_lines(rng, n):
    """n real lines of English prose from this machine's docs (copyright files, READMEs)."""
    lines = []
    for f in sorted(glob.glob("/usr/share/doc/*/copyright"))[:200]:
        try:
            lines += [ln.strip() for ln in Path(f).read_text(errors="ignore").splitlines() if 20 < len(ln.strip()) < 70]
        except OSError:
            pass
    return [lines[i] for i in rng.integers(0, len(lines), n)]


def text_photos(names, n, size, seed):
    """Photos with 3-8 lines of real text drawn at random places, sizes and colours: uint8 (n, size, size, 3)."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    out = photos(names, n, size, seed)
    for i in range(n):
        im = Image.fromarray(out[i])
        d = ImageDraw.Draw(im)
        for line in text_lines(rng, int(rng.integers(3, 9))):
            font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(14, 36)))
            ink = tuple(int(v) for v in (rng.integers(0, 60, 3) if rng.random() < 0.7 else rng.integers(200, 256, 3)))
            d.text((int(rng.integers(0, size // 3)), int(rng.integers(0, size - 40))), line, fill=ink, font=font)
        out[i] = np.asarray(im)
    return out


def ocrdet(out: Path) -> None:
    """rapidocr's PP-OCRv4 text detector (DBNet): (N, 3, 480, 480), ImageNet-normalised as rapidocr does."""
    for split, names, n, seed in (("calib", CALIB_PHOTOS + ["page", "text"], 40, 0),
                                  ("eval", EVAL_PHOTOS, 16, 1)):
        ims = text_photos(names, n, 480, seed)
        x = ((ims / 255 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
        np.savez(out / f"ocrdet_{split}.npz", x=x)


def noisy_speech(rng, voices, sentences, n, length, sr=16000):
    """n clips of `length` samples: espeak-ng sentences back to back, plus white/brown/babble noise at 0-30 dB."""
    clips = []
    for i in range(n):
        v = voices[i % len(voices)]
        parts, total = [], 0
        while total < length:
            s = speech(v, sentences[int(rng.integers(len(sentences)))], sr, pitch=int(rng.integers(35, 66)),
                       speed=int(rng.integers(140, 190)))
            parts += [s, np.zeros(int(sr * rng.uniform(0.05, 0.4)), np.float32)]
            total += len(s) + len(parts[-1])
        x = np.concatenate(parts)[:length]
        kind = i % 3
        if kind == 0:
            noise = rng.standard_normal(length)
        elif kind == 1:
            noise = np.cumsum(rng.standard_normal(length))
            noise -= np.convolve(noise, np.ones(801) / 801, "same")
        else:
            noise = speech(voices[(i + 3) % len(voices)], sentences[int(rng.integers(len(sentences)))], sr)
            noise = np.resize(noise, length)
        snr = rng.uniform(0, 30)
        noise *= np.sqrt(np.mean(x ** 2) / max(1e-12, np.mean(noise ** 2)) / 10 ** (snr / 10))
        y = x + noise
        clips.append((y / max(1e-6, np.abs(y).max()) * rng.uniform(0.2, 0.9)).astype(np.float32))
    return np.stack(clips)


def dnsmos(out: Path) -> None:
    """speechmos' DNSMOS P.835 (sig_bak_ovr.onnx): (N, 144160) 16 kHz waveforms (9.01 s), speech in noise."""
    for split, sents, n, seed in (("calib", SENTENCES[:4], 40, 0), ("eval", SENTENCES[4:], 16, 1)):
        x = noisy_speech(np.random.default_rng(seed), VOICES, sents, n, 144160)
        np.savez(out / f"dnsmos_{split}.npz", input_1=x)


def pesto(out: Path) -> None:
    """PESTO pitch estimator: (N, 16000) 16 kHz waveforms of 1 s, espeak-ng speech (clean and noisy)."""
    for split, sents, n, seed in (("calib", SENTENCES[:4], 48, 0), ("eval", SENTENCES[4:], 24, 1)):
        x = noisy_speech(np.random.default_rng(seed), VOICES, sents, n, 16000)
        np.savez(out / f"pesto_{split}.npz", x=x)


MAKERS = {"ocrdet": ocrdet, "dnsmos": dnsmos, "pesto": pesto}


if __name__ == "__main__":
    main(MAKERS)
