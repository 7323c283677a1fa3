"""The stored view-parameter columns (torch-free, so the store and stage 2 load without torch)."""

PARAM_COLUMNS = (
    "top", "left", "height", "width",  # crop box in source pixels
    "flip",  # 1 = horizontal flip
    "jitter", "brightness", "contrast", "saturation", "hue",  # jitter on/off and its factors
    "order0", "order1", "order2", "order3",  # jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    "gray",  # 1 = convert to 3-channel grayscale
    "blur_sigma",  # Gaussian blur sigma in pixels of a 224-px output (0 = none); scaled with the resolution
    "light0", "light1", "light2",  # PCA lighting alphas (0 = none)
    "interp",  # resize filter of the crop: 0 = bilinear, 1 = bicubic (both antialiased)
)  # fmt: skip
N_PARAMS = len(PARAM_COLUMNS)
COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}
