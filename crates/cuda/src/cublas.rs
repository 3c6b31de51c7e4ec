//! cuBLAS as the reference of `scalpel bench kernels`: the GEMM every hand-written kernel is
//! compared against, on the same device-resident operands. Never used for compute. Loaded
//! dynamically; a machine without libcublas gets an error naming it, not a panic.

use cudarc::cublas::{result, sys};
use scalpel_tensor::cpu::gemm::GemmShape;

use crate::{CudaError, DeviceBuffer, DeviceElement, Result, Runtime};

/// The operand and arithmetic types of a reference GEMM (f32 output and accumulation in all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands, f32 arithmetic (`cublasSgemm`).
    F32,
    /// f32 operands rounded to TF32 on the tensor cores.
    Tf32,
    /// bf16 operands on the tensor cores.
    Bf16,
}

pub struct Cublas {
    handle: sys::cublasHandle_t,
    runtime: Runtime,
}

impl Cublas {
    /// A handle on `rt`'s GPU (the emulator has no cuBLAS).
    pub fn new(rt: &Runtime) -> Result<Cublas> {
        if rt.is_emulator() {
            return Err(CudaError::Unavailable(
                "cuBLAS runs on a GPU only, not on the emulator".into(),
            ));
        }
        // SAFETY: only probes for the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "cuBLAS library (libcublas.so) not found".into(),
            ));
        }
        rt.make_current()?;
        let handle = result::create_handle()
            .map_err(|e| CudaError::Unavailable(format!("cuBLAS: {e:?}")))?;
        Ok(Cublas {
            handle,
            runtime: rt.clone(),
        })
    }

    /// `C = op(A)·op(B)` for row-major operands as `kernels::gemm::gemm` takes them. cuBLAS is
    /// column-major, so this computes `Cᵀ = op(B)ᵀ·op(A)ᵀ` with the operands swapped.
    pub fn gemm<T: DeviceElement>(
        &self,
        precision: Precision,
        s: GemmShape,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        c: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let element = std::mem::size_of::<T>();
        let expected = if precision == Precision::Bf16 { 2 } else { 4 };
        if element != expected
            || a.len() != s.m * s.k
            || b.len() != s.k * s.n
            || c.len() != s.m * s.n
        {
            return Err(CudaError::Shape(format!(
                "cuBLAS {precision:?} GEMM {s:?} on buffers of {}, {} and {} elements of {element} bytes",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let int = |v: usize| i32::try_from(v).map_err(|_| CudaError::Shape(format!("{v} > i32")));
        let (m, n, k) = (int(s.m)?, int(s.n)?, int(s.k)?);
        // Leading dimensions of the row-major storage, read column-major.
        let lda = if s.trans_a { m } else { k };
        let ldb = if s.trans_b { k } else { n };
        let (data, compute) = match precision {
            Precision::F32 => (
                sys::cudaDataType::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            Precision::Tf32 => (
                sys::cudaDataType::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            Precision::Bf16 => (
                sys::cudaDataType::CUDA_R_16BF,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.runtime.make_current()?;
        // SAFETY: the three buffers hold exactly the operands' elements (checked above) on this
        // handle's device; alpha and beta are host scalars of the compute type.
        unsafe {
            result::gemm_ex(
                self.handle,
                op(s.trans_b),
                op(s.trans_a),
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                b.device_ptr() as *const _,
                data,
                ldb,
                a.device_ptr() as *const _,
                data,
                lda,
                (&beta) as *const f32 as *const _,
                c.device_ptr() as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                n,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cuBLAS GEMM: {e:?}")))
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
