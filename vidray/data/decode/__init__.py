"""One module per decoding library, each with ``read_samples(path, stored_frames, stored_size, ...)``.

They are called through :func:`vidray.data.video.read_clip`, which picks one by name
(``data.decoder``). Every module does the same thing with its library: sample
the segment starts, apply rotation and sample aspect ratio, resize the short
side, centre-crop, and turn the library's failures into
:class:`vidray.data.clip.VideoError` categories. They import what they share
from vidray/data/clip.py, never vidray/data/video.py (which imports them).
"""
