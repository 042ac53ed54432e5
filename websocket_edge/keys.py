"""The web app's shared-state keys (`app[KEY]`), in one module below every handler.

`create_app` and the route groups set them; handlers read them. Keeping them here (not in `app.py` or
the module that fills one) means no handler module imports the app factory or another handler.
"""

from __future__ import annotations

from aiohttp import web

from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.storage.demo import DemoInfo

from .dispatch import AgentHub

SETTINGS_KEY = web.AppKey("speechpipe.settings", Settings)
STORE_KEY = web.AppKey("speechpipe.store", AsyncStore)
SYNC_STORE_KEY = web.AppKey("speechpipe.sync_store", Store)
DEMO_KEY = web.AppKey("speechpipe.demo", DemoInfo)
# A callable returning the SIP supervisor's health (set by `serve` when it runs media workers).
SIP_HEALTH_KEY = web.AppKey("speechpipe.sip_health", object)
HUB_KEY = web.AppKey("agent_hub", AgentHub)
# The client edge (a `client_ws.ClientEdge`), its engines (`pipeline.session.Engines`) and its agent
# factory (a `client_ws.AgentFactory`): typed loosely, so this module (and `app`, which the CLI imports)
# loads neither the edge nor the speech pipeline.
ENGINES_KEY = web.AppKey("speechpipe.engines", object)
CLIENT_EDGE_KEY = web.AppKey("speechpipe.client_edge", object)
AGENT_FACTORY_KEY = web.AppKey("speechpipe.agent_factory", object)

__all__ = ["AGENT_FACTORY_KEY", "CLIENT_EDGE_KEY", "DEMO_KEY", "ENGINES_KEY", "HUB_KEY", "SETTINGS_KEY",
           "SIP_HEALTH_KEY", "STORE_KEY", "SYNC_STORE_KEY"]
