"""The offline vision-language labeler: pseudo-labels of images against domain texts.

- vl: one `VisionLanguage` interface over any open_clip model (`load_vision_language`);
- views: the input views a labeler may average, and `VisionLanguageError` (below vl and lanit_lite);
- lanit_lite: the packaged offline labeler; align (its data: align_data): the training of its heads;
- prompts, pseudo_labels: prompt banks and LANIT's labelling rules; label: `python -m training.label`;
- emoji: the Twemoji data and the ground truth parsed from emoji names.
Imports training.data (image loading) and lanit_rt from outside this package, nothing else.
"""
