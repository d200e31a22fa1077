"""The capabilities beside ConvolutionalNN.py, a module each; the script imports them, never the other way round.

common        what every part shares: the classes, UserError, how a training run ended
backends      Keras on the chosen backend, imported once and quietly; Keras classes joined to their mixins
streams       the training batches of each epoch (order, shifts, mirroring, erasing) and the dropout masks
hardware      precision, the memory check, devices (--precision, --distribute)
outputs       files written atomically, and a run's outputs as one set
journal       signals and the resume journal (--resume)
model_file    the saved .keras archive and its notes for --predict
plots         the pictures and the history a training run writes
tta           test-time augmentation (--tta)
data_files    Fashion-MNIST from a folder: IDX, torchvision's layout, Kaggle's CSV (--data-dir)
study         the learning-rate study and repeated seeds (several --lr, several --seed)
tensorboard_logs  TensorBoard logs (--tensorboard)
ray_runs      the runs as Ray tasks (--ray)
predict       classifying the user's own images (--predict)
photos        a picture read as a 28x28 image like Fashion-MNIST
decode        any image file decoded as 8-bit gray or RGB
"""
