//! Which device: [`probe`] says whether device `ordinal` is usable and what it is, and
//! picks the NVRTC architecture the kernels are compiled for.

use cudarc::driver::sys;

use super::compile;
use super::driver::{self, check};
use super::DeviceInfo;
use crate::error::{NsaError, Result};

/// The NVRTC target for compute capability (major, minor): `sm_XY`, with the
/// architecture-specific `a` on 9.0 (wgmma and setmaxnreg exist only in `sm_90a`).
pub fn nvrtc_arch(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Whether CUDA device `ordinal` is usable: the driver and NVRTC load, the device exists
/// and has compute capability 8.0 or newer. Never panics; the error says why not.
pub fn probe(ordinal: i32) -> Result<DeviceInfo> {
    match std::panic::catch_unwind(|| probe_inner(ordinal)) {
        Ok(r) => r,
        Err(_) => Err(NsaError::BackendUnavailable("loading the CUDA libraries panicked".into())),
    }
}

fn probe_inner(ordinal: i32) -> Result<DeviceInfo> {
    let unavailable = |e: NsaError| match e {
        NsaError::Cuda(s) => NsaError::BackendUnavailable(s),
        other => other,
    };
    driver::libraries_present().map_err(NsaError::BackendUnavailable)?;
    // SAFETY: the driver library is present; plain driver queries.
    unsafe {
        check(sys::cuInit(0), "cuInit").map_err(unavailable)?;
        let mut n = 0;
        check(sys::cuDeviceGetCount(&mut n), "cuDeviceGetCount").map_err(unavailable)?;
        if n == 0 {
            return Err(NsaError::BackendUnavailable("the CUDA driver sees no device".into()));
        }
        if ordinal < 0 || ordinal >= n {
            return Err(NsaError::arg("device_ordinal", ordinal, format!("the CUDA driver sees devices 0..{n}")));
        }
        let mut dev = 0;
        check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
        use sys::CUdevice_attribute::*;
        let major = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let l2 = driver::device_attr(dev, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let mut name = [0 as std::ffi::c_char; 256];
        check(sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev), "cuDeviceGetName")?;
        let name = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let mut mem = 0usize;
        check(sys::cuDeviceTotalMem_v2(&mut mem, dev), "cuDeviceTotalMem")?;
        let mut drv = 0;
        check(sys::cuDriverGetVersion(&mut drv), "cuDriverGetVersion")?;
        let nvrtc = compile::nvrtc_version().map_err(unavailable)?;
        if major < 8 {
            return Err(NsaError::BackendUnavailable(format!(
                "device {ordinal} ({name}) has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer"
            )));
        }
        Ok(DeviceInfo {
            ordinal,
            name,
            compute_capability: (major, minor),
            arch: nvrtc_arch(major, minor),
            multiprocessors: sms,
            total_memory: mem,
            driver_version: drv,
            nvrtc_version: nvrtc,
            max_shared_per_block: smem,
            l2_cache_bytes: l2,
            device_count: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_gets_the_architecture_specific_target() {
        assert_eq!(nvrtc_arch(9, 0), "sm_90a");
        assert_eq!(nvrtc_arch(8, 0), "sm_80");
        assert_eq!(nvrtc_arch(8, 9), "sm_89");
        assert_eq!(nvrtc_arch(10, 0), "sm_100");
    }

    #[test]
    fn probe_never_panics() {
        match probe(0) {
            Ok(d) => assert!(d.compute_capability.0 >= 8),
            Err(NsaError::BackendUnavailable(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}
