"""Streaming mel -> waveform with the causal HiFT and a bounded history (the official BoundedVocoder rule).

Mel arrives in calls of any size and is processed in blocks of `block_frames` (default 64: a whole flow window of
50 frames, or a last chunk of up to 56, in one round; the official BoundedVocoder uses 16). The audio does not
depend on the block size: every output sample sees the same frames whatever the split, because each stage re-runs
over its full left context. Bigger blocks only mean fewer rounds and less re-run context. For each block:

1. F0 is predicted (in float64) for every frame that has its 3 frames of right context, re-running the
   predictor over the 8 frames of left context it needs.
2. The excitation for those frames is built with a float64 phase carried across calls (starting at 0):
   per frame, phase += hop * f0 * k / sr for harmonic k; the sine is held for the frame's 480 samples.
   The additive noise is read from a fixed uniform [0, 1) table at absolute sample positions.
3. Audio is decoded for every frame that has conv_pre's 4 frames of look-ahead plus one frame for the
   ISTFT overlap, re-running the filter network over `history` (31) frames of past context.

So output lags input by 3 + 4 + 1 = 8 frames (3840 samples) until the final call flushes them. The first
non-empty, non-final output is prefixed with 3840 zero samples, so audio stays aligned with the mel.
State lives in `VocoderState` (one per stream); the model and the noise table are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..audio.rates import SPEECH_RATE
from ..host_copy import upload
from .causal_hift import CausalF0Predictor, CausalHiFTGenerator
from .fold import fold_weight_norms, has_parametrizations
from .padded_graphs import PaddedGraphs

# The official table covers 300 s and is drawn unseeded at build time, so its values cannot be matched
# anyway; a 60 s table (52 MB) read at absolute positions modulo its length only changes the period.
NOISE_TABLE_SECONDS = 60


def default_source_noise_table(
    harmonics: int, sample_rate: int = SPEECH_RATE, seconds: float = NOISE_TABLE_SECONDS, seed: int = 0
) -> torch.Tensor:
    """Uniform [0, 1) table (1, seconds*sample_rate, harmonics) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, int(seconds * sample_rate), harmonics, generator=gen)


@dataclass(eq=False)
class VocoderState:
    """Per-stream state. Frame indices are absolute (since the stream started)."""

    mel: torch.Tensor  # (1, mels, n) float32, mel frames [mel_start, mel_start + n)
    source: torch.Tensor  # (1, 1, n*hop) float32, excitation of frames [source_start, ...)
    phase: torch.Tensor  # (1, 1, harmonics) float64, in cycles
    mel_start: int = 0
    source_start: int = 0
    source_end: int = 0
    emitted: int = 0
    finalized: bool = False
    first_output_pending: bool = True

    def clone(self) -> VocoderState:
        return replace(self, mel=self.mel.clone(), source=self.source.clone(), phase=self.phase.clone())


class StreamingVocoder:
    def __init__(self, model: CausalHiFTGenerator, noise_table: torch.Tensor, block_frames: int = 64) -> None:
        if model.training:
            raise ValueError("the streaming vocoder needs an eval-mode CausalHiFTGenerator")
        if block_frames < 1:
            raise ValueError("block_frames must be a positive integer")
        if noise_table.ndim != 3 or noise_table.shape[2] != model.harmonics:
            raise ValueError(
                f"noise table must have shape (1, n, {model.harmonics}), got {tuple(noise_table.shape)}"
            )
        self.model = model
        self.noise_table = noise_table
        self.block_frames = block_frames
        self.hop = model.hop
        # A float64 copy of the F0 predictor: F0 errors accumulate in the phase, so it runs in double. Its
        # weight norms are folded after the cast (g * v / ||v|| in double) when the source still has them.
        # (A fresh module, not a deepcopy: removing a parametrization from a deepcopy would also strip the
        # class shared with the original.)
        p = model.p
        self.f0_model = CausalF0Predictor(
            p.in_channels, p.f0_predictor.cond_channels, p.f0_predictor.num_class
        )
        if has_parametrizations(model.f0_predictor):
            self.f0_model.load_state_dict(model.f0_predictor.state_dict())
            self.f0_model = self.f0_model.double()
            fold_weight_norms(self.f0_model)
        else:
            fold_weight_norms(self.f0_model)
            self.f0_model.load_state_dict(model.f0_predictor.state_dict())
            self.f0_model = self.f0_model.double()
        self.f0_model = self.f0_model.eval().to(next(model.parameters()).device)
        self.f0_left = self.f0_model.left_context
        self.f0_right = self.f0_model.right_context
        self.decoder_right = model.look_right + 1
        self.history = model.receptive_history()
        self._spectrum: PaddedGraphs | None = None

    def use_padded_decode(self, graphs: bool) -> None:
        """Run the decoder network (up to the ISTFT) on batches padded to buckets, as CUDA graphs per
        geometry when `graphs` and CUDA is available (`padded_graphs`)."""
        self._spectrum = PaddedGraphs(self.model.decode_spectrum, graphs)

    def _run_decoder(
        self, mel: torch.Tensor, source: torch.Tensor, final: bool, lengths: list[int] | None = None
    ) -> torch.Tensor:
        """The decoder network on a batch of rows (each row on its own). `lengths`: final rows right-padded to a
        common width (`_pad_final_source`), each row's real mel frames; its ISTFT then runs on the row's own
        frames only, and its samples start the row (the rest is zeros). A batch that runs out of device memory
        runs again as two halves: its rows are independent, and a first batch of a new size (not yet captured,
        so its activations are fresh allocations) once failed every call of a tick on an H100 for 316 MiB."""
        try:
            if self._spectrum is None:
                return self.model.decode(mel, source, final)
            magnitude, phase = self._spectrum((mel, source), final)
            if lengths is None:
                return self.model.finish_decode(magnitude, phase, final)
            return self._finish_padded_finals(magnitude, phase, lengths, mel.shape[2])
        except torch.OutOfMemoryError:
            rows = mel.shape[0]
            if rows == 1:
                raise
            half = rows // 2
            first_lengths, rest_lengths = (
                (None, None) if lengths is None else (lengths[:half], lengths[half:])
            )
            first = self._run_decoder(mel[:half], source[:half], final, first_lengths)
            return torch.cat([first, self._run_decoder(mel[half:], source[half:], final, rest_lengths)])

    def _finish_padded_finals(
        self, magnitude: torch.Tensor, phase: torch.Tensor, lengths: list[int], width: int
    ) -> torch.Tensor:
        """The ISTFT of final rows padded to `width` mel frames, each on its own spectrum frames (a frame past a
        row's end would overlap its last samples): what each row alone would give, left-aligned."""
        out = magnitude.new_zeros(magnitude.shape[0], width * self.hop)
        per_frame = self.model.stft_frames_per_mel_frame
        for length in sorted(set(lengths)):
            rows = [r for r, n in enumerate(lengths) if n == length]
            frames = magnitude.shape[2] - (width - length) * per_frame
            index = upload(rows, magnitude.device, torch.long)
            wav = self.model.finish_decode(
                magnitude.index_select(0, index)[:, :, :frames],
                phase.index_select(0, index)[:, :, :frames],
                True,
            )
            out.index_copy_(0, index, F.pad(wav, (0, out.shape[1] - wav.shape[1])))
        return out

    def _pad_final_source(self, source: torch.Tensor, pad: int) -> torch.Tensor:
        """A final row's excitation right-padded by `pad` samples: first with its reflection, as the centred
        source STFT pads the end of the row alone, so every spectrum frame up to the row's end is the same;
        zeros after that (only frames past the end, which `_finish_padded_finals` drops, see them)."""
        mirrored = min(pad, self.model.spectral.n_fft // 2, source.shape[2] - 1)
        if mirrored:
            source = F.pad(source, (0, mirrored), mode="reflect")
        return F.pad(source, (0, pad - mirrored))

    @property
    def final_width(self) -> int:
        """The padded path's width for finals (mel frames, a multiple of 8): the most a final decode can take,
        its history plus a last block and the frames still held back."""
        return -(-(self.history + self.block_frames + self.delay_frames) // 8) * 8

    @property
    def delay_frames(self) -> int:
        return self.f0_right + self.decoder_right

    @property
    def delay_samples(self) -> int:
        return self.delay_frames * self.hop

    def new_state(self) -> VocoderState:
        device = self.model.conv_pre.bias.device
        return VocoderState(
            mel=torch.zeros(1, self.model.p.in_channels, 0, device=device),
            source=torch.zeros(1, 1, 0, device=device),
            phase=torch.zeros(1, 1, self.model.harmonics, dtype=torch.float64, device=device),
        )

    def _excitation(
        self, states: list[VocoderState], f0: torch.Tensor, first_frames: list[int], lengths: list[int]
    ) -> torch.Tensor:
        """F0 (B, n) of frames starting at absolute `first_frames[b]` -> excitation (B, 1, n*hop).

        Row b's first lengths[b] frames are real (the rest padding, whose output is junk). Advances each
        state's float64 phase to the end of its real frames.
        """
        p = self.model.p
        multiples = torch.arange(1, self.model.harmonics + 1, dtype=f0.dtype, device=f0.device)
        per_sample = (f0[:, :, None] * multiples / p.sampling_rate).remainder(1)
        phase = torch.cat([st.phase for st in states], dim=0)
        cycles = per_sample.double().cumsum(dim=1) * self.hop + phase
        for b, (st, n) in enumerate(zip(states, lengths, strict=True)):
            st.phase = cycles[b : b + 1, n - 1 : n].remainder(1)
        sine = torch.sin(cycles.remainder(1) * (2 * math.pi)).to(f0)
        sine = sine.repeat_interleave(self.hop, dim=1)
        voiced = (f0[:, :, None] > p.nsf_voiced_threshold).to(f0).repeat_interleave(self.hop, dim=1)
        noise_amp = voiced * p.nsf_sigma + (1 - voiced) * p.nsf_alpha / 3
        table = self.noise_table[0]
        offsets = upload([f * self.hop for f in first_frames], table.device, torch.long)
        positions = (offsets[:, None] + torch.arange(sine.shape[1], device=table.device)) % table.shape[0]
        noise = table[positions].to(f0)  # (B, n*hop, harmonics)
        excitation = sine * p.nsf_alpha * voiced + noise_amp * noise
        return self.model.m_source(excitation).transpose(1, 2)

    def _make_sources(self, states: list[VocoderState], final: bool) -> None:
        """Extend each state's excitation to every frame whose F0 context is complete.

        All rows run as one F0 batch: each row's mel is left-aligned and right-padded with zeros, and the
        predictor runs with a zero future. Its look-ahead conv then sees a row's own frames for every output
        a non-final call keeps (and zeros past a final row's end, as a final call does); the later convs
        only look back. The excitation runs per block (`block_frames`) over the rows that still have frames."""
        todo = []  # (state, mel frames, first real F0 output, new frames)
        for st in states:
            received = st.mel_start + st.mel.shape[2]
            ready = received if final else max(0, received - self.f0_right)
            if ready > st.source_end:
                start = max(0, st.source_end - self.f0_left)
                todo.append((st, received - start, st.source_end - start, ready - st.source_end))
        if not todo:
            return
        todo.sort(key=lambda row: -row[3])  # rows still producing frames in a block are then a prefix
        width = max(length for _, length, _, _ in todo)
        feats = torch.cat(
            [
                F.pad(st.mel[:, :, st.mel.shape[2] - length :], (0, width - length))
                for st, length, _, _ in todo
            ]
        )
        f0_all = self.f0_model(feats.double(), final=True).to(feats)
        longest = max(count for _, _, _, count in todo)
        f0 = torch.cat(
            [
                F.pad(f0_all[b : b + 1, skip : skip + count], (0, longest - count))
                for b, (_, _, skip, count) in enumerate(todo)
            ]
        )
        pieces: list[list[torch.Tensor]] = [[st.source] for st, _, _, _ in todo]
        for begin in range(0, longest, self.block_frames):
            rows = range(sum(1 for _, _, _, count in todo if count > begin))
            members = [todo[b][0] for b in rows]
            lengths = [min(self.block_frames, todo[b][3] - begin) for b in rows]
            block = f0[: len(rows), begin : begin + max(lengths)]
            excitation = self._excitation(members, block, [st.source_end for st in members], lengths)
            for k, (b, st, n) in enumerate(zip(rows, members, lengths, strict=True)):
                pieces[b].append(excitation[k : k + 1, :, : n * self.hop])
                st.source_end += n
        for (st, _, _, _), parts in zip(todo, pieces, strict=True):
            st.source = torch.cat(parts, dim=2)

    def _decode(self, states: list[VocoderState], final: bool) -> list[torch.Tensor]:
        """Audio of every frame whose conv_pre look-ahead (+1 ISTFT frame) is complete, per state.

        Non-final calls run as one batch whatever each row's history: rows are left-aligned and right-padded
        with zeros (to a multiple of 8 frames). Every sample a row keeps depends only on its own frames:
        conv_pre looks 4 frames ahead and those are the row's look-ahead, the later layers look back, the
        source STFT frames near the padding fall in the cut look-ahead and the ISTFT frames near it in the
        held-back frame. A final call keeps everything up to the row's end: on the plain path finals batch by
        length; on the padded path (`use_padded_decode`) they are right-padded too (zero mel, which is conv_pre's
        zero future of a final, and a reflected source, `_pad_final_source`), and each row's ISTFT runs on its own
        frames, so a round's finals share one decoder batch of one width (`final_width`)."""
        hop = self.hop
        out = [st.mel.new_zeros(1, 0) for st in states]
        todo = []  # (index, mel frames, first kept frame)
        for i, st in enumerate(states):
            ready = st.source_end if final else max(0, st.source_end - self.decoder_right)
            if ready > st.emitted:
                start = max(0, st.emitted - self.history)
                todo.append((i, st.source_end - start, st.emitted - start))
        padded = not final or self._spectrum is not None
        groups: dict[int, list[tuple[int, int, int]]] = {}
        if padded and todo:  # one batch: rows right-padded to a multiple of 8 frames
            width = -(-max(r[1] for r in todo) // 8) * 8
            if final:  # one width for every final a round can have: the warm-up captures it
                width = max(width, self.final_width)
            groups[width] = todo
        else:
            for row in todo:
                groups.setdefault(row[1], []).append(row)
        for width, members in groups.items():
            feats, sources = [], []
            for i, length, _ in members:
                st = states[i]
                end = st.source_end - st.mel_start
                feats.append(F.pad(st.mel[:, :, end - length : end], (0, width - length)))
                source = st.source[:, :, st.source.shape[2] - length * hop :]
                pad = (width - length) * hop
                sources.append(self._pad_final_source(source, pad) if final else F.pad(source, (0, pad)))
            lengths = [length for _, length, _ in members] if final and padded else None
            speech = self._run_decoder(torch.cat(feats, dim=0), torch.cat(sources, dim=0), final, lengths)
            for row, (i, length, skip) in enumerate(members):
                st = states[i]
                ready = st.source_end if final else st.source_end - self.decoder_right
                kept = length if final else length - self.decoder_right
                piece = speech[row : row + 1, skip * hop : kept * hop]
                if piece.shape[1] != (ready - st.emitted) * hop:
                    raise RuntimeError("streaming vocoder produced an unexpected number of samples")
                out[i] = piece
                st.emitted = ready
        return out

    def _forget(self, st: VocoderState) -> None:
        """Drop mel and source that no future F0 or decode call can reach."""
        keep_mel = max(0, min(st.emitted - self.history, st.source_end - self.f0_left))
        keep_source = max(0, st.emitted - self.history)
        st.mel = st.mel[:, :, keep_mel - st.mel_start :].clone()
        st.source = st.source[:, :, (keep_source - st.source_start) * self.hop :].clone()
        st.mel_start = keep_mel
        st.source_start = keep_source

    def _advance(self, states: list[VocoderState], final: bool) -> list[torch.Tensor]:
        self._make_sources(states, final)
        speech = self._decode(states, final)
        for st in states:
            self._forget(st)
        return speech

    @torch.inference_mode()
    def stream(self, state: VocoderState, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Feed fresh mel (1, mels, n); returns the samples (1, m) that became ready (float32).

        `final` flushes the delayed frames; afterwards the state accepts only empty final calls.
        """
        return self.stream_batch([state], [mel], [final])[0]

    @torch.inference_mode()
    def stream_batch(
        self, states: list[VocoderState], mels: list[torch.Tensor], finals: list[bool]
    ) -> list[torch.Tensor]:
        """`stream` for several independent streams: per block round (`block_frames`), one F0 batch and one decoder
        batch over all streams (final flushes: see `_decode`); see `_make_sources` and `_decode`."""
        if not len(states) == len(mels) == len(finals):
            raise ValueError("states, mels and finals must have the same length")
        if len({id(st) for st in states}) != len(states):
            raise ValueError("a vocoder state can appear only once per batch")
        outputs: list[list[torch.Tensor]] = [[] for _ in states]
        active = []
        for i, (st, mel, final) in enumerate(zip(states, mels, finals, strict=True)):
            if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != st.mel.shape[1]:
                raise ValueError(f"mel must have shape (1, {st.mel.shape[1]}, n), got {tuple(mel.shape)}")
            if st.finalized:
                if mel.shape[2] or not final:
                    raise ValueError("this vocoder stream is already finalized; start a new state")
                continue
            active.append(i)
        parts = {i: [p for p in mels[i].split(self.block_frames, dim=2) if p.shape[2]] for i in active}
        for k in range(max((len(v) for v in parts.values()), default=0)):
            members = [i for i in active if k < len(parts[i])]
            for i in members:
                states[i].mel = torch.cat([states[i].mel, parts[i][k].float()], dim=2)
            # A closing stream's last block goes straight to the final advance below: it emits the same
            # samples as a non-final advance followed by the final one (every stage sees the same frames),
            # in one F0 and one decoder batch instead of two.
            members = [i for i in members if not (finals[i] and k == len(parts[i]) - 1)]
            if not members:
                continue
            for i, speech in zip(
                members, self._advance([states[i] for i in members], final=False), strict=True
            ):
                outputs[i].append(speech)
        closing = [i for i in active if finals[i]]
        if closing:
            for i, speech in zip(
                closing, self._advance([states[i] for i in closing], final=True), strict=True
            ):
                outputs[i].append(speech)
                states[i].finalized = True
        results = []
        for i, (st, mel) in enumerate(zip(states, mels, strict=True)):
            speech = torch.cat(outputs[i], dim=1) if outputs[i] else mel.new_zeros(1, 0)
            if speech.shape[1] and st.first_output_pending:
                st.first_output_pending = False
                if not finals[i]:
                    speech = torch.cat([speech.new_zeros(1, self.delay_samples), speech], dim=1)
            results.append(speech)
        return results
