"""Live outputs of a session: RTMP/RTMPS push (:mod:`.rtmp`), WHIP push (:mod:`.whip`);
shared state events, backoff and secret redaction in :mod:`.base`."""
