"""edge-ti's export side: the only code that imports torch (installed as `edge_ti_export`).

The folder keeps the name `export/` that the project's layout specifies; pyproject.toml maps it to
the package `edge_ti_export` ([tool.setuptools.package-dir]) because a top-level package named
`export` would be too generic to install beside other projects' modules.
"""
