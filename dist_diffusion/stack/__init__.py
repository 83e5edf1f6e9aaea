"""The embedded local stack: SeaweedFS's S3 on loopback (or a bridge address), with access
keys, for the demo, the tests and a laptop; `dist-diffusion stack up|down|status`."""

from .seaweed import (DEFAULT_ROOT, S3Server, _load_state, export_lines, stack_down, stack_status, stack_up,
                      start_s3, stop_s3, weed_binary)

__all__ = ["DEFAULT_ROOT", "S3Server", "_load_state", "export_lines", "stack_down", "stack_status", "stack_up",
           "start_s3", "stop_s3", "weed_binary"]
