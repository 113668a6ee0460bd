"""Session-oriented inference on top of `MiniCPMO45.model`: turn-based chat, half-duplex streaming and the
full-duplex unit loop, all over one loaded model and one slot-based KV cache."""
