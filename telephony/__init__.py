"""Phone calls: pjsua2 SIP user agents in media-worker processes, bridged to the pipeline."""
