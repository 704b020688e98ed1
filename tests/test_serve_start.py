"""Starting the service (``serve_app.app.run_config``, what ``python -m serve_app`` runs): its own local Ray
has no Jobs API and takes Ray's token authentication, a running application is never replaced, and "no
tokens on loopback" is judged by where the Serve proxies really listen, not by what the config asks for."""

import os


import httpx
import pytest
from serve_helpers import service_config

from bench.local_service import free_port
from serve_app.app import APP_NAME, run_config


def test_a_local_start_is_loopback_only_never_replaces_an_app_and_checks_the_real_bind(isolated_from_ray, tiny_model_dir):
    import ray
    from ray import serve

    config = service_config(tiny_model_dir, free_port(), token_hashes_file=None)  # no tokens: loopback only
    auth_mode_before = os.environ.get("RAY_AUTH_MODE")
    try:
        url = run_config(config, ray_address="local")
        assert httpx.get(f"{url.rstrip('/')}/healthz", timeout=30).status_code == 200
        assert not ray._private.worker._global_node.address_info.get("webui_url")  # no dashboard, no Jobs API
        if auth_mode_before is None:  # an operator's explicit choice is Ray's to honour
            assert os.environ["RAY_AUTH_MODE"] == "token"  # what Ray sets when it turns token auth on

        with pytest.raises(ValueError, match=f"application named '{APP_NAME}' runs on this cluster already"):
            run_config(config)
        assert serve.status().applications[APP_NAME].status == "RUNNING"  # untouched

        # Serve already listening on every interface (a cluster's, say): the config's 127.0.0.1 does not
        # make it loopback, so without tokens it is refused.
        serve.shutdown()
        serve.start(http_options={"host": "0.0.0.0", "port": free_port()})
        with pytest.raises(ValueError, match="no API tokens: refusing to serve without authentication on 0.0.0.0"):
            run_config(config)
        assert APP_NAME not in serve.status().applications
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("when", ["while starting", "once serving"])
def test_sigterm_stops_the_service_cleanly(isolated_from_ray, tiny_model_dir, when):
    """A service manager's stop (SIGTERM) shuts down as Ctrl-C does, also before the replicas are up
    (ray.init installs Ray's own handler, which dumps a stack and aborts)."""
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    service = subprocess.Popen([sys.executable, "-m", "serve_app", "--model", str(tiny_model_dir), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    ready = "starting Serve and the replicas" if when == "while starting" else "Press Ctrl-C"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(ready in line for line in lines):
        line = service.stdout.readline()
        if not line:
            break
        lines.append(line)
    assert any(ready in line for line in lines), "".join(lines)[-3000:]
    service.send_signal(signal.SIGTERM)
    rest, _ = service.communicate(timeout=60)
    output = "".join(lines) + rest
    assert service.returncode == 0, output[-3000:]
    assert "Stopping." in output and "SIGTERM received" not in output
