"""Config precedence and validation, the CLI mapping, certificates, and process import boundaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import crypto

from rtc_server.certs import ensure_certificate
from rtc_server.config import AppConfig, ConfigError, load_config
from run import build_parser, cli_overrides
from tests.conftest import REPO_ROOT


def test_repo_config_toml_lists_every_default() -> None:
    assert load_config(REPO_ROOT / "config.toml") == AppConfig()
    text = (REPO_ROOT / "config.toml").read_text()
    for section, model in AppConfig.model_fields.items():
        assert f"[{section}]" in text
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"\n{key} =" in text, f"config.toml lacks {section}.{key}"


def test_calls_default_to_the_tracks_measured_packet_size() -> None:
    """`rtc.outbound_packet_ms`'s default is the one media_tracks documents (the config does not import it)."""
    from media_tracks.speech_track import DEFAULT_PACKET_MS
    from rtc_server.call_speech import CallSpeech

    assert AppConfig().rtc.outbound_packet_ms == DEFAULT_PACKET_MS == CallSpeech().track.packet_ms


def test_cli_overrides_file_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nhost = "127.0.0.1"\n[loopback]\ndelay_s = 0.5\n')
    args = build_parser().parse_args(["--port", "9100", "--gpus", "0,1", "--http", "--model-path", "/m"])
    config = load_config(path, cli_overrides(args))
    assert config.server.port == 9100  # CLI beats the file
    assert config.server.host == "127.0.0.1"  # file beats the default
    assert config.server.http is True
    assert config.workers.gpus == [0, 1]
    assert config.model.path == "/m"
    assert config.loopback.delay_s == 0.5
    assert config.queue.max_length == AppConfig().queue.max_length  # default


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "unknown key 'server.prot'"),
        ("[nonsense]\nx = 1\n", "unknown key 'nonsense'"),
        ("[server]\nport = 'high'\n", "'server.port'"),
        ("[server\n", "not valid TOML"),
        ("[workers]\ntick_gather_ms = 600\n", "'workers.tick_gather_ms'"),  # the worker's own limit is higher
        ("[rtc]\nopus_compression_level = 11\n", "'rtc.opus_compression_level': .*less than or equal to 10"),
        ("[rtc]\noutbound_packet_ms = 30\n", "'rtc.outbound_packet_ms': .*20, 40 or 60"),
        ("[rtc]\ninline_audio_decode = 'maybe'\n", "'rtc.inline_audio_decode'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(path)


def test_bad_gpus_flag_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--gpus", "0,x"])


def test_certificate_is_created_once_with_localhost_names(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(tmp_path / "certs")
    first = cert_path.read_bytes()
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, first)
    san = str(cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert "localhost" in san and "127.0.0.1" in san
    assert ensure_certificate(tmp_path / "certs") == (cert_path, key_path)
    assert cert_path.read_bytes() == first  # reused on the next start


def test_worker_does_not_import_aiortc_and_server_does_not_import_torch() -> None:
    code = (
        "import sys, inference.worker, inference.modes.loopback;"
        "assert 'aiortc' not in sys.modules and 'torch' not in sys.modules, 'worker imports too much'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    code = "import sys, run, rtc_server.app; assert 'torch' not in sys.modules, 'server imports torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
