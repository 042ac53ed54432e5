"""Old home of the agent channel's wire format, which now lives in core as `speechpipe.protocol`.

Kept so `from speechpipe.runner import protocol` keeps working: this module *is* `speechpipe.protocol`
(same object, so constants, classes and monkeypatches are shared).
"""

import sys

from speechpipe import protocol as _protocol

sys.modules[__name__] = _protocol
