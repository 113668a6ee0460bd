"""The audio front and back end of the whole server, in one place.

* `rates`: the sample rates and frame/unit sizes (model input 16 kHz, speech 24 kHz, WebRTC 48 kHz).
* `filterbank`: mel scales and mel filter banks (Slaney/HTK triangles, Kaldi's banks).
* `mel`: the Whisper-style log-mel of whole clips and the transforms every mel path shares.
* `mel_stream`: the streaming log-mel of one session (duplex units, half-duplex segments).
* `mel_batch`: the streaming mels of many sessions computed in one batched transform, on the host or a device.
* `resample`: the one resampling path (PyAV / libswresample, one filter thread).
* `wav`: the one RIFF/WAVE reader and writer.
* `load`: audio files of any container as mono float32 at a given rate.

Nothing is imported here, so that the media processes can use `rates`, `resample` and `wav` (numpy and PyAV)
without importing torch.
"""
