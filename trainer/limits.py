"""Default limits on hostile data, in one place: the data layer applies them, the config exposes them.

Kept free of imports so that `trainer.config` (and `python -m trainer --help`) stays light.
"""

#: Images with more pixels are refused from their header (decompression bombs): 8192 x 8192.
MAX_PIXELS = 8192 * 8192
#: Images whose decoded samples (width x height x bands x bytes per sample) exceed this are refused
#: from their header: 8192 x 8192 8-bit RGBA fits; a 16-bit RGBA image fits up to 4096 x 8192.
MAX_IMAGE_BYTES = 256 * 2**20
#: Parquet pages above this are refused before they are read. A page is what a reader decompresses
#: whole and holds one or more cells; pyarrow puts up to 1024 values in a page, so a row group of
#: 100 images of 2 MB makes 200 MB pages.
MAX_CELL_BYTES = 256 * 2**20
