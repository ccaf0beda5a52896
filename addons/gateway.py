"""The gateway as a mitmproxy script: `mitmdump -s addons/gateway.py --mode reverse:https://api.openai.com`.

The logic lives in the `ai_gateway` package beside this file, importable from a plain checkout
(this folder goes on sys.path) and when the project is pip-installed.
"""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

from ai_gateway.proxy.addon import Gateway  # noqa: E402

addons = [Gateway()]
