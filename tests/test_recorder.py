"""Stereo recording: alignment, crash-safety and repair."""

import os
import struct
import subprocess
import sys
import wave

import numpy as np

from speechpipe.pipeline.recorder import StereoRecorder, describe_wav, repair_wav


def read_stereo(path):
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2 and w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return data[0::2], data[1::2]


def test_agent_audio_lands_where_the_user_clock_stood(tmp_path):
    rec = StereoRecorder(tmp_path / "a.wav", 16000, flush_every_s=0.1)
    for i in range(100):  # 2 s of user audio, 20 ms at a time; agent talks 0.5-1.0 s
        rec.add_user(np.full(320, 1000, np.int16))
        if 25 <= i < 50:
            rec.add_agent(np.full(320, -2000, np.int16), rec.position)
    info = rec.close()
    user, agent = read_stereo(info.path)
    assert len(user) == 32000 and info.duration_s == 2.0
    assert (user == 1000).all()
    on = np.flatnonzero(agent)
    assert on[0] == 26 * 320 and on[-1] == 51 * 320 - 1  # placed after the frame that was current
    assert info.size_bytes == os.path.getsize(info.path)


def test_killed_writer_leaves_playable_wav_and_repair_fixes_torn_tail(tmp_path):
    path = tmp_path / "k.wav"
    code = f"""
import os, numpy as np
from speechpipe.pipeline.recorder import StereoRecorder
rec = StereoRecorder({str(path)!r}, 16000, flush_every_s=0.5)
for _ in range(120):
    rec.add_user(np.full(320, 500, np.int16))
rec._file.write(b"\\x01\\x02\\x03")  # a torn write past the last header update
rec._file.flush()
os.kill(os.getpid(), 9)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    with wave.open(str(path)) as w:  # playable before repair: the header counts what was flushed
        assert w.getnframes() >= 16000 * 2
    assert repair_wav(path) is True
    info = describe_wav(path)
    size = os.path.getsize(path)
    assert (size - 44) % 4 == 0 and struct.unpack("<I", path.read_bytes()[40:44])[0] == size - 44
    assert info.duration_s >= 2.0
    assert repair_wav(path) is False
