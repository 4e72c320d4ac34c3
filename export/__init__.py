"""edge-ti's export side: the only code that imports torch (installed as `edge_ti_export`)."""
