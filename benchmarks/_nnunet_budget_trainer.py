"""An nnU-Net v2 trainer that stops at a wall-clock budget, for benchmarks/supervised.py.

The benchmark copies this file into the nnU-Net virtual environment (it must sit inside the
``nnunetv2.training.nnUNetTrainer`` package for ``nnUNetv2_train -tr`` to find it). Everything else is
nnU-Net's default trainer: its plan, network, augmentation, loss, SGD and poly schedule. Epochs are
shortened (25 iterations, 5 validation batches) so that the budget is checked often; after the first
epoch the schedule's length is set to the number of epochs that fit the budget
(``MEDSEG_BUDGET_MINUTES``). Training time, epochs and batch size go to ``medseg_budget.json``.
"""

import json
import os
import time
from os.path import join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_medsegBudget(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
        self.budget_s = float(os.environ["MEDSEG_BUDGET_MINUTES"]) * 60

    def run_training(self):
        self.on_train_start()
        started = time.perf_counter()
        while True:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
            elapsed = time.perf_counter() - started
            per_epoch = elapsed / self.current_epoch
            if self.current_epoch == 1:
                self.num_epochs = max(1, int(self.budget_s / per_epoch))
                self.lr_scheduler.max_steps = self.num_epochs
            if self.current_epoch >= self.num_epochs or elapsed + per_epoch > self.budget_s:
                break
        training_seconds = time.perf_counter() - started
        self.on_train_end()
        batch = self.configuration_manager.batch_size
        with open(join(self.output_folder, "medseg_budget.json"), "w") as f:
            json.dump(
                {
                    "epochs": self.current_epoch,
                    "training_seconds": training_seconds,
                    "batch_size": batch,
                    "patch_size": list(self.configuration_manager.patch_size),
                    "images_per_second": self.current_epoch * self.num_iterations_per_epoch * batch / training_seconds,
                },
                f,
            )
