"""OpenAI Realtime API compatibility: WebRTC calls (`/v1/realtime/calls`, `oai-events` data channel) and
WebSocket sessions (`/v1/realtime`) over the same admission, workers and modes as our own API.

models.py: the client and server events (pydantic); session_map.py: `session.update` -> mode, prompt, voice and
options; conversation.py: one Realtime session's protocol state; responses.py: our mode outputs -> Realtime
server events; webrtc.py and websocket.py: the two transports. See docs/REALTIME.md.
"""
