"""Mitosis detector training on the TUPAC16 auxiliary layout, evaluated with the TUPAC rule.

Data (`regions`): `<case>/<region>.tif` region images and `<case>/<region>.csv` `row,col`
centroids (no CSV = no mitoses). Everything is brought to 0.5 um/px, the resolution of the 20x
tiles that scoring feeds the exported detector (the real auxiliary set is 40x, 0.25 um/px, so
it is halved). Cases, not regions, are split into training and held-out sets.

Training (`patches`, `train`) runs on 64 px patches through `mitosis_patch_model` (the
detector's central map cells): positives centred on each mitosis and shifted by up to half a
map cell (so the nearest cell learns to fire), negatives from tissue away from mitoses, most
of them at dark blobs (nuclei: the informative negatives), regions without mitoses included;
then hard-negative rounds add the detector's own false positives. Patches are re-drawn every
epoch.

The exported model is `inference.padded_detector`: the detector with its input mirrored by
32 px and the map cropped back, since a detector trained on patch centres fires along image
borders.

Detection on a region (`inference`) is what scoring does on a tile: the fully convolutional
detector's map, local maxima above a threshold, non-maximum suppression. The threshold is
chosen on the training cases and the held-out cases are scored once at that threshold, beside
a darkness baseline (`baseline`).
"""
