"""`fedscore report` and `fedscore compare`: finished run directories in, one self-contained
HTML page (figures embedded) out, with LaTeX tables, PDF and SVG figures and CSVs for a paper."""
