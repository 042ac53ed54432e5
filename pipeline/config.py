"""Old home of the pipe configuration models, which now live in core as `speechpipe.pipe_config`.

Re-exported here so `from speechpipe.pipeline.config import PipeConfig` keeps working.
"""

from speechpipe.pipe_config import (
    BargeInConfig,
    EndpointingConfig,
    PipeConfig,
    RecordingConfig,
    STTConfig,
    TTSConfig,
    VADConfig,
)

__all__ = ["BargeInConfig", "EndpointingConfig", "PipeConfig", "RecordingConfig", "STTConfig", "TTSConfig",
           "VADConfig"]
