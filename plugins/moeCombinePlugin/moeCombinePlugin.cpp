#include "moeCombinePlugin.h"

#include "../common/pluginUtils.h"
#include "moeCombineKernel.h"

#include <exception>
#include <string>

using namespace nvinfer1;

namespace nucleus
{
namespace plugin
{
namespace
{
constexpr char const* kCOMBINE_NAME = "MoECombine";
constexpr char const* kKNOWN_ATTRIBUTES[] = {nullptr};
constexpr int32_t kNB_INPUTS = 4;
constexpr int32_t kNB_OUTPUTS = 1;
enum IoIndex : int32_t
{
    kSHARED = 0,
    kEXPERT = 1,
    kINDICES = 2,
    kGATING = 3,
    kOUTPUT = 4
};

bool checkIo(int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        logError(std::string(kCOMBINE_NAME)
            + ": expected 4 inputs (shared_output, expert_output, token_indices, gating) and 1 output");
        return false;
    }
    return true;
}

//! Ranks: shared [B,S,H], expert [E,B,C,H], indices [B,E,C], gating [B,E,C]; static parts must agree.
bool checkDims(Dims const& shared, Dims const& expert, Dims const& indices, Dims const& gating) noexcept
{
    if (shared.nbDims != 3 || expert.nbDims != 4 || indices.nbDims != 3 || gating.nbDims != 3)
    {
        logError(std::string(kCOMBINE_NAME)
            + ": expected shared_output [B,S,H], expert_output [E,B,C,H], token_indices and gating [B,E,C]");
        return false;
    }
    auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }; // -1: not known yet
    bool const ok = same(shared.d[0], indices.d[0]) && same(expert.d[0], indices.d[1])
        && same(expert.d[1], shared.d[0]) && same(expert.d[2], indices.d[2]) && same(expert.d[3], shared.d[2]);
    bool sameGating = true;
    for (int32_t i = 0; i < 3; ++i)
    {
        sameGating = sameGating && same(indices.d[i], gating.d[i]);
    }
    if (!ok || !sameGating)
    {
        logError(std::string(kCOMBINE_NAME) + ": input shapes disagree on B, E, C or H");
        return false;
    }
    return true;
}
} // namespace

// IPluginV3 ----------------------------------------------------------------------------------------------------

IPluginCapability* MoECombinePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MoECombinePlugin::clone() noexcept
{
    try
    {
        return new MoECombinePlugin();
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

// IPluginV3OneCore -----------------------------------------------------------------------------------------------

char const* MoECombinePlugin::getPluginName() const noexcept
{
    return kCOMBINE_NAME;
}

char const* MoECombinePlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* MoECombinePlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

// IPluginV3OneBuild ----------------------------------------------------------------------------------------------

int32_t MoECombinePlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t MoECombinePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    if (!isFloatType(inputTypes[kSHARED]) || inputTypes[kEXPERT] != inputTypes[kSHARED]
        || inputTypes[kINDICES] != DataType::kINT64 || inputTypes[kGATING] != DataType::kFLOAT)
    {
        logError(std::string(kCOMBINE_NAME)
            + ": shared_output and expert_output must share a float type (float32, float16 or bfloat16), "
              "token_indices must be int64 and gating float32");
        return -1;
    }
    outputTypes[0] = inputTypes[kSHARED];
    return 0;
}

int32_t MoECombinePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    if (inputs[kSHARED].nbDims != 3)
    {
        logError(std::string(kCOMBINE_NAME) + ": shared_output must be rank 3 [B, S, H]");
        return -1;
    }
    outputs[0] = inputs[kSHARED];
    return 0;
}

bool MoECombinePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= kNB_INPUTS + kNB_OUTPUTS)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kSHARED: return isFloatType(desc.type);
    case kINDICES: return desc.type == DataType::kINT64;
    case kGATING: return desc.type == DataType::kFLOAT;
    default: return desc.type == inOut[kSHARED].desc.type; // expert_output and output: the compute dtype
    }
}

int32_t MoECombinePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
    int32_t nbOutputs) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    if (!checkDims(in[kSHARED].max, in[kEXPERT].max, in[kINDICES].max, in[kGATING].max))
    {
        return -1;
    }
    if (in[kINDICES].max.d[1] > NUCLEUS_COMBINE_MAX_EXPERTS)
    {
        logError(std::string(kCOMBINE_NAME) + ": more than 1024 experts are not supported");
        return -1;
    }
    return 0;
}

size_t MoECombinePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNB_INPUTS || inputs[kSHARED].max.nbDims != 3 || inputs[kINDICES].max.nbDims != 3)
    {
        return 0;
    }
    Dims const& shared = inputs[kSHARED].max;
    Dims const& indices = inputs[kINDICES].max;
    return nucleusMoECombineWorkspaceSize(static_cast<int>(shared.d[0]), static_cast<int>(shared.d[1]),
        static_cast<int>(indices.d[1]), static_cast<int>(indices.d[2]));
}

// IPluginV3OneRuntime --------------------------------------------------------------------------------------------

int32_t MoECombinePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (!checkIo(nbInputs, nbOutputs))
    {
        return -1;
    }
    return checkDims(in[kSHARED].dims, in[kEXPERT].dims, in[kINDICES].dims, in[kGATING].dims) ? 0 : -1;
}

int32_t MoECombinePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims const& shared = inputDesc[kSHARED].dims;
        Dims const& indices = inputDesc[kINDICES].dims;
        int const batch = static_cast<int>(shared.d[0]);
        int const tokens = static_cast<int>(shared.d[1]);
        int const hidden = static_cast<int>(shared.d[2]);
        int const experts = static_cast<int>(indices.d[1]);
        int const capacity = static_cast<int>(indices.d[2]);
        if (static_cast<int64_t>(batch) * tokens * hidden == 0)
        {
            return 0;
        }
        int const status = nucleusMoECombineLaunch(inputs[kSHARED], inputs[kEXPERT],
            static_cast<int64_t const*>(inputs[kINDICES]), static_cast<float const*>(inputs[kGATING]), outputs[0],
            toNucleusDType(inputDesc[kSHARED].type), batch, tokens, experts, capacity, hidden, workspace,
            nucleusMoECombineWorkspaceSize(batch, tokens, experts, capacity), stream);
        if (status != NUCLEUS_STATUS_SUCCESS)
        {
            logError(std::string(kCOMBINE_NAME) + ": kernel launch failed: " + nucleusKernelStatusString(status));
            return status;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string(kCOMBINE_NAME) + ": " + e.what());
    }
    return -1;
}

IPluginV3* MoECombinePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* MoECombinePlugin::getFieldsToSerialize() noexcept
{
    return &mSerialCollection; // no attributes
}

// Creator --------------------------------------------------------------------------------------------------------

char const* MoECombinePluginCreator::getPluginName() const noexcept
{
    return kCOMBINE_NAME;
}

char const* MoECombinePluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* MoECombinePluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* MoECombinePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* MoECombinePluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        if (fc != nullptr)
        {
            FieldReader(kCOMBINE_NAME, fc).warnUnknown(kKNOWN_ATTRIBUTES);
        }
        return new MoECombinePlugin();
    }
    catch (std::exception const& e)
    {
        logError(std::string("cannot create ") + kCOMBINE_NAME + " '" + (name != nullptr ? name : "") + "': " + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace nucleus
