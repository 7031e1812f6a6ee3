"""Spoken-question input: decode, check and shape audio for the recognisers.

Every recogniser here wants the same thing: mono float32 at 16 kHz, speech only, at most one
Whisper window (30 s) long. Files are decoded with soundfile (libsndfile: WAV, FLAC, OGG
Vorbis/Opus, MP3 with libsndfile >= 1.1), channels averaged, resampled with librosa (soxr) and
stripped of leading/trailing silence. Anything that cannot become such a signal raises
:class:`AudioError`, whose message names the problem and the fix, so `elma ask --audio` can
print it as is. There is deliberately no audioread/ffmpeg fallback: it is slow to start, can
"decode" garbage, and the supported formats cover what people record; other formats are
rejected with the ffmpeg command that converts them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0  # one Whisper window
MIN_SECONDS = 0.1
SILENCE_DBFS = -60.0  # audio whose loudest 40 ms frame is quieter than this counts as silent
TRIM_TOP_DB = 40.0  # trimmed: leading/trailing frames this far below the loudest frame
TRIM_PAD_SECONDS = 0.1  # kept on each side of the speech so soft onsets ("f", "h") survive
SUPPORTED_FORMATS = ("WAV", "FLAC", "OGG", "MP3")

AudioSource = str | Path | bytes | BinaryIO


class AudioError(ValueError):
    """Input audio that cannot be used; the message says what is wrong and what to do."""


def _file_name(name: str) -> str:
    return "INPUT" if name.startswith("<") else Path(name).name


def _convert_hint(name: str) -> str:
    return (
        f"Use a WAV, FLAC, OGG or MP3 recording, e.g. convert it with "
        f"`ffmpeg -i {name} -ac 1 -ar {SAMPLE_RATE} question.wav`."
    )


def load_audio(
    source: AudioSource,
    *,
    max_seconds: float = MAX_SECONDS,
    trim: bool = True,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Decode a file (path, bytes or binary file object) into checked mono float32 samples at
    `sample_rate`, silence trimmed; raises :class:`AudioError` for unusable input."""
    samples, sr, name = _decode(source, max_seconds)
    return prepare_audio(samples, sr, max_seconds=max_seconds, trim=trim, sample_rate=sample_rate, name=name)


def _decode(source: AudioSource, max_seconds: float) -> tuple[np.ndarray, int, str]:
    """Samples (frames, channels), rate and a name for messages. Files far longer than the limit
    (4x, plus a minute of silence) are refused from their header, before decoding them."""
    import soundfile as sf

    if isinstance(source, str | Path):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise AudioError(f"audio file {name} does not exist. Check the path.")
        if not path.is_file():
            raise AudioError(f"{name} is not a file. Give the path of one audio recording.")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file {name} is empty (0 bytes). Record the question again.")
        handle: str | io.BytesIO = name
    elif isinstance(source, bytes | bytearray):
        name = "<audio bytes>"
        if not source:
            raise AudioError("the audio data is empty (0 bytes). Record the question again.")
        handle = io.BytesIO(source)
    else:
        name = str(getattr(source, "name", "<audio stream>"))
        data = source.read()
        if not data:
            raise AudioError(f"{name} is empty (0 bytes). Record the question again.")
        handle = io.BytesIO(data)
    try:  # AudioError is a ValueError: let ours through unchanged
        info = sf.info(handle)
        if not isinstance(handle, str):
            handle.seek(0)
        if info.duration > 4 * max_seconds + 60:
            raise AudioError(
                f"{name} is {info.duration:.0f} s long, far more than the {max_seconds:g} s limit. "
                "Ask one short question per recording (or cut the file)."
            )
        samples, sr = sf.read(handle, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError, TypeError) as exc:
        raise AudioError(
            f"{name} is not a readable audio file ({str(exc).strip() or type(exc).__name__}); "
            f"it may be corrupt or in an unsupported format. {_convert_hint(_file_name(name))}"
        ) from exc
    return samples, int(sr), name


def prepare_audio(
    samples: np.ndarray,
    sr: int,
    *,
    max_seconds: float = MAX_SECONDS,
    trim: bool = True,
    sample_rate: int = SAMPLE_RATE,
    name: str = "the audio",
) -> np.ndarray:
    """Check decoded samples and make them mono float32 at `sample_rate`, silence trimmed.

    `samples` is (frames,) or (frames, channels), integer PCM or float. The length limit applies
    to the trimmed signal, which is what a recogniser sees.
    """
    y = _to_float_mono(np.asarray(samples), name)
    if sr <= 0:
        raise AudioError(f"{name} has an invalid sample rate ({sr} Hz). Re-export the recording.")
    if y.size == 0:
        raise AudioError(f"{name} contains no audio samples. Record the question again.")
    if not np.all(np.isfinite(y)):
        raise AudioError(f"{name} contains NaN or infinite samples; the file is corrupt. Record it again.")
    if sr != sample_rate:
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    peak_db = _loudest_frame_dbfs(y, sample_rate)
    if peak_db < SILENCE_DBFS:
        raise AudioError(
            f"{name} is silent (loudest part {peak_db:.0f} dBFS, below {SILENCE_DBFS:.0f} dBFS). "
            "Check that the microphone is on and not muted, then record the question again."
        )
    start, end = speech_bounds(y, sample_rate)
    if (end - start) / sample_rate < MIN_SECONDS:
        raise AudioError(
            f"{name} holds only {(end - start) * 1000 / sample_rate:.0f} ms of sound. "
            "Record the whole question."
        )
    if trim:
        margin = int(round(TRIM_PAD_SECONDS * sample_rate))
        y = y[max(0, start - margin) : min(y.size, end + margin)]
    seconds = y.size / sample_rate
    if seconds > max_seconds:
        raise AudioError(
            f"{name} holds {seconds:.1f} s of sound, more than the {max_seconds:g} s limit. "
            "Ask one short question per recording (or cut the file)."
        )
    return np.ascontiguousarray(y, dtype=np.float32)


def _to_float_mono(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim not in (1, 2):
        raise AudioError(f"{name} has shape {samples.shape}; expected (frames,) or (frames, channels).")
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        samples = (samples.astype(np.float64) - (info.max + info.min + 1) / 2) / (info.max + 1 - info.min) * 2
    elif not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"{name} has samples of type {samples.dtype}; expected integer PCM or float.")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # channel average, as librosa.to_mono does
    return samples.astype(np.float32)


def _loudest_frame_dbfs(y: np.ndarray, sample_rate: int) -> float:
    """Level of the loudest 40 ms frame (10 ms hop), in dB relative to full scale."""
    import librosa

    hop = max(1, sample_rate // 100)
    rms = librosa.feature.rms(y=y, frame_length=4 * hop, hop_length=hop, center=True)[0]
    return float(20 * np.log10(max(float(rms.max(initial=0.0)), 1e-10)))


def speech_bounds(
    y: np.ndarray, sample_rate: int = SAMPLE_RATE, *, top_db: float = TRIM_TOP_DB
) -> tuple[int, int]:
    """Sample range from the first to the last frame within `top_db` of the loudest one."""
    import librosa

    _, (start, end) = librosa.effects.trim(y, top_db=top_db, frame_length=512, hop_length=128)
    return int(start), int(end)


def trim_silence(
    y: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    *,
    top_db: float = TRIM_TOP_DB,
    pad: float = TRIM_PAD_SECONDS,
) -> np.ndarray:
    """Cut leading and trailing frames quieter than `top_db` below the loudest one, keeping
    `pad` seconds on each side (never more than the original)."""
    start, end = speech_bounds(y, sample_rate, top_db=top_db)
    margin = int(round(pad * sample_rate))
    return y[max(0, start - margin) : min(y.size, end + margin)]


def to_pcm16(y: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> little-endian 16-bit PCM (rounded, clipped)."""
    scaled = np.round(np.asarray(y, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2")


def duration_seconds(y: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    return float(y.size) / sample_rate


# ---------------------------------------------------------------- SpeechRecognition interop


def audio_data_to_array(audio_data, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """speech_recognition.AudioData (what Microphone/listen produce) -> float32 mono samples."""
    raw = audio_data.get_raw_data(convert_rate=sample_rate, convert_width=2)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def array_to_audio_data(y: np.ndarray, sample_rate: int = SAMPLE_RATE):
    """Float samples -> speech_recognition.AudioData (16-bit PCM), for SpeechRecognition's engines."""
    import speech_recognition as sr

    return sr.AudioData(to_pcm16(y).tobytes(), sample_rate, 2)


def capture_microphone(
    *,
    timeout: float = 5.0,
    max_seconds: float = MAX_SECONDS,
    device_index: int | None = None,
) -> np.ndarray:
    """Record one spoken question from a microphone through SpeechRecognition.

    Needs PyAudio and an input device; without either raises :class:`AudioError` that says so
    and suggests passing a recording instead.
    """
    import speech_recognition as sr

    fallback = "or record the question to a WAV/FLAC/OGG file and pass it with --audio FILE"
    try:
        microphone = sr.Microphone(device_index=device_index)
    except AttributeError as exc:  # SpeechRecognition's "Could not find PyAudio"
        raise AudioError(
            "microphone capture needs PyAudio, which is not installed: `pip install PyAudio` "
            f"(it builds against the portaudio19-dev system package), {fallback}."
        ) from exc
    except (OSError, AssertionError) as exc:  # bad device index
        raise AudioError(
            f"no usable microphone ({exc or 'device index out of range'}). Connect one, {fallback}."
        ) from exc
    recognizer = sr.Recognizer()
    try:
        with microphone as stream:
            recognizer.adjust_for_ambient_noise(stream, duration=0.5)
            audio = recognizer.listen(stream, timeout=timeout, phrase_time_limit=max_seconds)
    except sr.WaitTimeoutError as exc:
        raise AudioError(f"nobody spoke within {timeout:g} s. Try again, closer to the microphone.") from exc
    except (OSError, AssertionError) as exc:  # PyAudio: no default input device / bad device index
        raise AudioError(
            f"no usable microphone ({exc or 'no input device'}). Connect one, {fallback}."
        ) from exc
    return prepare_audio(
        audio_data_to_array(audio), SAMPLE_RATE, max_seconds=max_seconds, name="the microphone recording"
    )
