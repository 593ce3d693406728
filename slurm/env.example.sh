# Example setup block for a real cluster: the lines every cnncam job runs before Python starts.
# Copy the lines you need into a Slurm profile (configs/slurm/<cluster>.yaml):
#
#   slurm:
#     setup:
#       - module purge
#       - module load cuda/12.1
#       - source "$HOME/venvs/cnncam/bin/activate"
#
# or pass them on the command line: --setup 'module load cuda/12.1' --setup 'source ...'.
# Each entry is one shell line of the sbatch script (run by bash on the first node of the job);
# newlines inside an entry are refused.  Check the result with --dry-run.

module purge
module load cuda/12.1                        # or whatever `module avail cuda` lists
source "$HOME/venvs/cnncam/bin/activate"     # or: conda activate cnncam

# Optional, often useful:
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"   # one thread per allocated CPU
export NCCL_DEBUG=WARN                               # NCCL errors in the job log, not silence
# export NCCL_SOCKET_IFNAME=ib0                      # pin the interface on multi-homed nodes
# export HDF5_USE_FILE_LOCKING=FALSE                 # shared filesystems without POSIX locks
