"""The local end-to-end demo (`python -m entrypoints.demo`), its S3 server and the small models it builds."""
