"""Model monitoring: traffic capture, feedback and live accuracy, drift (docs/monitoring.md).

The server's part is service.monitor.hub.Monitor; nothing is imported here, so that `kiln` (which
registers `kiln monitor` from service.monitor.cli) does not load the Prometheus metrics before
`kiln serve --workers N` has set up their multiprocess folder.
"""
