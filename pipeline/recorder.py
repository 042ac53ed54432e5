"""Session recording: one stereo PCM16 WAV per session, user on the left, agent on the right.

The user track is the session clock: it grows by every input frame. Agent audio is placed where the user
track stood when the frame left the server, so both sides line up as the caller heard them. Audio reaches
disk about once a second with a header that already counts it, so a process killed mid-call leaves a
playable file; `repair_wav` fixes the header of a file whose writer died between those updates.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_HEADER_BYTES = 44


def _wav_header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    block_align = channels * 2
    return b"".join([
        b"RIFF", struct.pack("<I", 36 + data_bytes), b"WAVE",
        b"fmt ", struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align,
                             block_align, 16),
        b"data", struct.pack("<I", data_bytes),
    ])


@dataclass(frozen=True)
class RecordingInfo:
    path: Path
    sample_rate: int
    channels: int
    duration_s: float
    size_bytes: int
    sha256: str


class StereoRecorder:
    """Writes aligned user/agent audio at `sample_rate`; all calls come from the session's event loop."""

    def __init__(self, path: Path | str, sample_rate: int = 16000, flush_every_s: float = 1.0) -> None:
        path = Path(path)
        self.path = path
        self.sample_rate = sample_rate
        self._flush_samples = int(sample_rate * flush_every_s)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")
        self._file.write(_wav_header(sample_rate, 2, 0))
        self._written = 0  # frames (sample pairs) on disk
        self._user: list[np.ndarray] = []
        self._user_len = 0
        # Agent samples waiting for the user track to reach them, keyed by absolute start position.
        self._agent = np.zeros(0, np.int16)
        self._paused = False
        self.closed = False

    @property
    def position(self) -> int:
        """Samples of user audio recorded so far: the session clock."""
        return self._written + self._user_len

    def position_ms(self) -> int:
        return self.position * 1000 // self.sample_rate

    def pause(self) -> None:
        """Keep time but write silence (recording.pause from the agent)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def add_user(self, pcm16: np.ndarray) -> None:
        if self.closed:
            return
        self._user.append(np.zeros_like(pcm16) if self._paused else pcm16)
        self._user_len += len(pcm16)
        if self._user_len >= self._flush_samples:
            self._flush()

    def add_agent(self, pcm16: np.ndarray, at: int) -> None:
        """Place agent samples at absolute sample position `at` (mixing over anything already there)."""
        if self.closed or len(pcm16) == 0:
            return
        if self._paused:
            pcm16 = np.zeros_like(pcm16)
        start = max(at, self._written) - self._written
        pcm16 = pcm16[max(0, self._written - at):]
        end = start + len(pcm16)
        if end > len(self._agent):
            grown = np.zeros(end, np.int16)
            grown[: len(self._agent)] = self._agent
            self._agent = grown
        seg = self._agent[start:end].astype(np.int32) + pcm16
        self._agent[start:end] = np.clip(seg, -32768, 32767)

    def _flush(self, final: bool = False) -> None:
        user = np.concatenate(self._user) if self._user else np.zeros(0, np.int16)
        n = len(user)
        if final:
            n = max(n, len(self._agent))
            user = np.pad(user, (0, n - len(user)))
        if n == 0:
            return
        agent = self._agent[:n]
        if len(agent) < n:
            agent = np.pad(agent, (0, n - len(agent)))
        stereo = np.empty(2 * n, np.int16)
        stereo[0::2] = user
        stereo[1::2] = agent
        self._file.write(stereo.tobytes())
        self._written += n
        self._agent = self._agent[n:]
        self._user, self._user_len = [], 0
        self._rewrite_header()

    def _rewrite_header(self) -> None:
        self._file.flush()
        data_bytes = self._written * 4
        self._file.seek(4)
        self._file.write(struct.pack("<I", 36 + data_bytes))
        self._file.seek(40)
        self._file.write(struct.pack("<I", data_bytes))
        self._file.seek(0, os.SEEK_END)
        self._file.flush()

    def close(self) -> RecordingInfo:
        """Write everything still buffered, fix the header and return what the recordings row needs."""
        if not self.closed:
            self._flush(final=True)
            self._file.close()
            self.closed = True
        return describe_wav(self.path)


def describe_wav(path: Path) -> RecordingInfo:
    data = path.read_bytes()
    channels, sample_rate = struct.unpack("<HI", data[22:28])
    frames = (len(data) - _HEADER_BYTES) // (2 * channels)
    return RecordingInfo(
        path=path, sample_rate=sample_rate, channels=channels, duration_s=frames / sample_rate,
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )


def repair_wav(path: Path) -> bool:
    """Make a WAV whose writer died playable: trim a torn sample and set the sizes from the file length.

    Returns True if the header needed fixing.
    """
    with open(path, "r+b") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:4] != b"RIFF" or head[36:40] != b"data":
            raise ValueError(f"{path} is not a PCM WAV written by StereoRecorder")
        channels = struct.unpack("<H", head[22:24])[0]
        size = os.fstat(f.fileno()).st_size
        data_bytes = (size - _HEADER_BYTES) // (2 * channels) * (2 * channels)
        if struct.unpack("<I", head[40:44])[0] == data_bytes and size == _HEADER_BYTES + data_bytes:
            return False
        f.truncate(_HEADER_BYTES + data_bytes)
        f.seek(4)
        f.write(struct.pack("<I", 36 + data_bytes))
        f.seek(40)
        f.write(struct.pack("<I", data_bytes))
    return True
